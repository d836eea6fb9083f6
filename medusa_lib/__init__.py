"""medusa_lib: the code behind the Medusa workbook (Cai et al., 2024, "Medusa").

Modules, one concept each: config, files, base, data, heads, train, tree, export, decoding,
generate (CLI), bench, plotting. Notebooks import from here; nothing is re-exported.

    from medusa_lib.config import get_config
"""

__version__ = "0.1.0"
