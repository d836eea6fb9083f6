"""The run-comparison widget of notebook 02: choose settings (the paper's Medusa-1 heads by default),
press Train, see the losses and a metric of the main runs and of the runs trained here overlaid;
and notebook 03's curve explorer (`runs_explorer`: a metric menu and a smoothing slider).

A click trains `click_config(...)` into its own folder, `train.run_dir` (data/<preset>/runs/<what
differs>/), so the runs that notebooks 03-06 read (heads/, hydra/) are never written. The same
settings again resume instead of retraining. Progress, the overlay and any error show inside the
widget's output area; the button is disabled while a run trains.

    box = train_widget(cfg, model, tokenizer, caches, steps=300)
    display(box)
"""

from __future__ import annotations

from pathlib import Path

from medusa_lib.config import HYDRA, WorkbookConfig

SEES = ("none", "root", "path")  # Medusa-1, root-aware, sequential (see heads.py)


def click_config(cfg: WorkbookConfig, num_heads: int, num_layers: int, token_inputs: str, lr: float,
                 train_steps: int) -> WorkbookConfig:
    """The settings one click trains: cfg with the widget's values (the sequential heads take the
    rest of config.HYDRA: wider blocks, the restricted vocabulary, the soft target)."""
    extra = {k: v for k, v in HYDRA.items() if k != "token_inputs"} if token_inputs == "path" else {}
    return cfg.replace(**extra, num_heads=num_heads, num_layers=num_layers, token_inputs=token_inputs, lr=lr,
                       train_steps=train_steps)


def train_clicked(run_cfg: WorkbookConfig, model, tokenizer, caches: dict, on_eval=None) -> dict:
    """Train one click's settings (train.run_training) and mark the folder as the widget's, so the
    overlay shows it beside the main runs (train.finished_runs)."""
    from medusa_lib import train

    result = train.run_training(run_cfg, model, tokenizer, caches=caches, on_eval=on_eval)
    (Path(result["out_dir"]) / train.WIDGET_MARK).touch()
    return result


def plot_losses_and(logs: dict, metric: str):
    """Two figures for an overlay: each head's loss (eval solid, train dashed), then `metric`."""
    from medusa_lib.plotting import plot_runs
    return plot_runs(logs, "loss", with_train=True), plot_runs(logs, metric)


def train_widget(cfg: WorkbookConfig, model, tokenizer, caches: dict, steps: int, metric: str = "cacc@1"):
    """Sliders, a Train button and an output area (an ipywidgets VBox; `.button` and `.output` are
    reachable as attributes for scripted clicks). The sliders start at the paper's Medusa-1 heads."""
    import ipywidgets as W
    from IPython.display import clear_output, display

    from medusa_lib.train import finished_runs, read_log, training_time

    sliders = dict(num_heads=W.IntSlider(cfg.num_heads, 1, 5, description="heads"),
                   num_layers=W.IntSlider(cfg.num_layers, 1, 3, description="layers/head"),
                   token_inputs=W.Dropdown(options=list(SEES), value="none", description="sees"),
                   lr=W.FloatLogSlider(cfg.lr, base=10, min=-4, max=-2, description="lr"),
                   train_steps=W.IntText(steps, description="steps"))
    button, out = W.Button(description="Train", button_style="primary"), W.Output()

    def show_runs(rows=None):
        import matplotlib.pyplot as plt
        with out:
            clear_output(wait=True)
            for fig in plot_losses_and({name: read_log(folder) for name, folder in finished_runs(cfg).items()}, metric):
                display(fig)
                plt.close(fig)

    def on_train(_):
        button.disabled = True
        try:
            run_cfg = click_config(cfg, **{name: s.value for name, s in sliders.items()})
            with out:
                result = train_clicked(run_cfg, model, tokenizer, caches, on_eval=show_runs)
            show_runs()
            with out:
                print(f"{training_time(result)} -> {result['out_dir']}")
        except Exception as err:  # shown here, not in the server log
            with out:
                print(f"Training failed: {err}")
        finally:
            button.disabled = False

    button.on_click(on_train)
    box = W.VBox([*sliders.values(), button, out])
    box.button, box.output, box.sliders = button, out, sliders
    return box


def runs_explorer(logs: dict, metrics=("acc@1", "acc@5", "cacc@1", "cacc@5", "loss")):
    """A metric menu and a smoothing slider over `plotting.plot_runs` (an ipywidgets VBox; `.metric`,
    `.smooth` and `.output` are reachable as attributes). Each figure is put into the output area as
    display data, never through the Output widget's capture or `clear_output`: headless runs (nbclient,
    as CI runs the notebooks) sat ~20 minutes after `ipywidgets.interactive` drew its first figure so."""
    import ipywidgets as W
    import matplotlib.pyplot as plt

    from medusa_lib.plotting import plot_runs

    metric = W.Dropdown(options=list(metrics), value=metrics[0], description="metric")
    smooth = W.IntSlider(value=1, min=1, max=10, description="smooth")
    out = W.Output()

    def draw(_=None):
        fig = plot_runs(logs, metric.value, smooth=smooth.value)
        out.outputs = ()
        out.append_display_data(fig)
        plt.close(fig)  # shown once, in the output area

    metric.observe(draw, "value")
    smooth.observe(draw, "value")
    draw()
    box = W.VBox([W.HBox([metric, smooth]), out])
    box.metric, box.smooth, box.output = metric, smooth, out
    return box
