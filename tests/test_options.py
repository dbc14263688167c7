"""Every command's options: declared once, with one default and one help text, and the same name on
the command line, in YAML and in the Python API."""

from __future__ import annotations

import pytest
import typer

from medlatent.audits.config import (
    AugmentConfig,
    CounterfactualConfig,
    DiffusionClassifyConfig,
    EncoderAuditConfig,
    GapConfig,
)
from medlatent.cli import app
from medlatent.config import (
    AutoencoderTrainConfig,
    BenchConfig,
    ClassifierEvalConfig,
    ClassifierTrainConfig,
    CompareConfig,
    DiffusionBenchConfig,
    DiffusionTrainConfig,
    EvaluateConfig,
    PushConfig,
    SampleConfig,
    ScoreConfig,
    from_flat,
    leaves,
)

# Every command but `report` (a run folder its only argument): its options all come from one config
# (besides --config, --quiet, --json of the benchmarks and the model argument of classifier eval).
CONFIGURED = {
    "gap": GapConfig,
    "augment": AugmentConfig,
    "audit": EncoderAuditConfig,
    "score": ScoreConfig,
    "counterfactual": CounterfactualConfig,
    "autoencoder train": AutoencoderTrainConfig,
    "classifier train": ClassifierTrainConfig,
    "classifier eval": ClassifierEvalConfig,
    "bench classifiers": BenchConfig,
    "bench diffusion": DiffusionBenchConfig,
    "diffusion train": DiffusionTrainConfig,
    "diffusion sample": SampleConfig,
    "diffusion evaluate": EvaluateConfig,
    "diffusion classify": DiffusionClassifyConfig,
    "compare": CompareConfig,
    "push": PushConfig,  # its MODEL_DIR and REPO_ID arguments: settings with cli=False, as classifier eval's MODEL
}
OWN = {"config", "quiet", "help"}
# What a required setting is given in these tests (score writes a file; compare's runs are a list),
# and what makes a config valid.
GIVEN = {"out": "x.csv", "model": "x", "runs": ["a", "b"]}
VALID = {ClassifierTrainConfig: {"autoencoder": "builtin:kl-f4-synthetic"}}


def required(cls) -> dict:
    """A valid configuration's settings: its required ones and any it needs beside (`VALID`)."""
    return {
        **{leaf.option: GIVEN.get(leaf.option, "x") for leaf in leaves(cls) if leaf.required},
        **VALID.get(cls, {}),
    }


def commands(group=None, prefix: str = "") -> dict:
    """Every leaf command of the CLI by its path (e.g. "diffusion sample")."""
    group = group or typer.main.get_command(app)
    found = {}
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        found.update(commands(command, f"{path} ") if hasattr(command, "commands") else {path: command})
    return found


def test_every_option_of_every_command_is_declared_once_with_a_help_text():
    found = commands()
    assert set(found) == set(CONFIGURED) | {"report"}
    for path, command in found.items():
        names = [opt for param in command.params for opt in param.opts]
        assert len(names) == len(set(names)), f"{path}: an option declared twice"
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert (param.help or "").strip(), f"{path} {param.opts[0]}: no help text"


@pytest.mark.parametrize("path", sorted(CONFIGURED))
def test_a_configured_commands_options_are_its_config_fields_by_the_same_names(path):
    cls = CONFIGURED[path]
    command = commands()[path]
    options = [param for param in command.params if param.param_type_name == "option" and param.name not in OWN]
    cli = {param.opts[0].removeprefix("--") for param in options}
    fields = {leaf.option for leaf in leaves(cls) if leaf.field.metadata.get("cli", True)}
    assert cli == fields
    needed = required(cls)
    for leaf in leaves(cls):  # the YAML key and the API keyword: the option's name, or the field's
        given = needed.get(leaf.option, leaf.default)
        for key in {leaf.option, leaf.name}:
            config = from_flat(cls, {**{k: v for k, v in needed.items() if k != leaf.option}, key: given})
            value = config
            for part in leaf.path:
                value = getattr(value, part)
            assert value == given, (path, key)
    for param in options:  # one default: the help shows the field's
        leaf = next(leaf for leaf in leaves(cls) if leaf.option == param.opts[0].removeprefix("--"))
        assert leaf.field.metadata["help"] in param.help


@pytest.mark.parametrize("path", sorted(CONFIGURED))
def test_a_commands_saved_settings_run_it_again(path, tmp_path):
    from medlatent.api import load_config
    from medlatent.rundir import write_settings

    cls = CONFIGURED[path]
    config = load_config(None, required(cls), cls)
    write_settings(tmp_path / "config.yaml", config)
    # An argument rather than an option (classifier eval's MODEL) is given again beside the file.
    arguments = {
        k: v
        for k, v in required(cls).items()
        if not next(leaf for leaf in leaves(cls) if leaf.option == k).field.metadata.get("cli", True)
    }
    assert load_config(tmp_path / "config.yaml", arguments, cls) == config
