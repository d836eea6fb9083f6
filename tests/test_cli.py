"""The command lines print an expected failure as one line naming what to do, and exit 2."""

import os
import subprocess
import sys

import pytest

CASES = [
    (["medusa_lib.bench", "--methods", ""], {}, "--methods is empty: name at least one of"),
    (["medusa_lib.generate", "--prompt", "hi", "--plain", "--tree", "t.json"], {}, "--plain decodes without a tree"),
    (["medusa_lib.generate", "--prompt", "Tell me about llamas"], {}, "No exported model in .*run notebook 04"),
    (["medusa_lib.bench", "--methods", "ort,bogus"], {}, r"Unknown method\(s\) \['bogus'\]"),
    (["medusa_lib.train", "--preset", "tiny"], {"WORKBOOK_OVERRIDES": '{"num_heads": "3"}'},
     "num_heads must be a whole number, not '3'"),
]


@pytest.mark.parametrize("args,env,message", CASES)
def test_an_expected_failure_is_one_line_not_a_traceback(tmp_path, args, env, message):
    import re
    run = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "WORKBOOK_DATA": str(tmp_path / "data"), **env})
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert "Traceback" not in run.stderr and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert re.search(message, lines[0]), lines[0]
