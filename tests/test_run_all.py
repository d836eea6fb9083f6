"""Committed notebook outputs: no progress bars, no widget state, no absolute paths."""

import nbformat

from medusa_lib.run_all import clean_outputs


def test_clean_outputs_keeps_results_and_drops_noise():
    root = "/home/someone/medusa"
    cell = nbformat.v4.new_code_cell("x", outputs=[
        nbformat.v4.new_output("stream", name="stderr", text="training heads:  40%|####  | 600/1500\r"),
        nbformat.v4.new_output("stream", name="stdout", text=f"wrote {root}/data/full/onnx/base.onnx\n"),
        nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "a"},
                                                     "text/plain": "VBox(children=...)"}),
        nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "b"}}),
        nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "c"},
                                                     "text/plain": "tokenising:   0%|          | 0/400 [00:00<?, ?it/s]"}),
        nbformat.v4.new_output("display_data", data={"text/plain": "caching: 100%|##########| 9.3k/9.3k [00:03<00:00, 2.9kit/s]"}),
        nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "d"},
                                                     "text/plain": "tokenising ShareGPT: 0it [00:00, ?it/s]"}),
    ])
    nb = nbformat.v4.new_notebook(cells=[cell], metadata={"widgets": {"state": {}}})
    clean_outputs(nb, root)
    outs = nb.cells[0].outputs
    assert [o["output_type"] for o in outs] == ["stream", "display_data"]
    assert outs[0]["text"] == "wrote data/full/onnx/base.onnx\n"
    assert dict(outs[1]["data"]) == {"text/plain": "VBox(children=...)"}
    assert "widgets" not in nb.metadata
    before = nbformat.writes(nb)
    clean_outputs(nb, root)  # a cleaned notebook (such as a committed one) stays as it is
    assert nbformat.writes(nb) == before
