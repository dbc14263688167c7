"""Every command's options: declared once, with one default and one help text, and the same name on
the command line, in YAML and in the Python API."""

from __future__ import annotations

import pytest
import typer

from medlatent.audits.config import (
    SET_BY_AUDIT,
    SET_BY_AUGMENT,
    SET_BY_ENCODER_AUDIT,
    AugmentConfig,
    CounterfactualConfig,
    DiffusionClassifyConfig,
    EncoderAuditConfig,
    GapConfig,
)
from medlatent.cli import app
from medlatent.config import EvaluateConfig, SampleConfig, ScoreConfig, from_flat, leaves

# The commands whose options all come from one config (besides --config and --quiet).
CONFIGURED = {
    "gap": (GapConfig, SET_BY_AUDIT),
    "augment": (AugmentConfig, SET_BY_AUGMENT),
    "audit": (EncoderAuditConfig, SET_BY_ENCODER_AUDIT),
    "score": (ScoreConfig, ()),
    "counterfactual": (CounterfactualConfig, ()),
    "diffusion sample": (SampleConfig, ()),
    "diffusion evaluate": (EvaluateConfig, ()),
    "diffusion classify": (DiffusionClassifyConfig, ()),
}
OWN = {"config", "quiet", "help"}


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
    assert set(CONFIGURED) <= set(found) and len(found) >= 14
    for path, command in found.items():
        names = [opt for param in command.params for opt in param.opts]
        assert len(names) == len(set(names)), f"{path}: an option declared twice"
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert (param.help or "").strip(), f"{path} {param.opts[0]}: no help text"


@pytest.mark.parametrize("path", sorted(CONFIGURED))
def test_a_configured_commands_options_are_its_config_fields_by_the_same_names(path):
    cls, exclude = CONFIGURED[path]
    command = commands()[path]
    cli = {param.opts[0].removeprefix("--") for param in command.params if param.name not in OWN}
    fields = {leaf.option for leaf in leaves(cls, exclude) if leaf.field.metadata.get("cli", True)}
    assert cli == fields
    required = {
        leaf.option: "x.csv" if leaf.option == "out" else "x"
        for leaf in leaves(cls, exclude)
        if leaf.field.metadata.get("required")
    }
    for leaf in leaves(cls, exclude):  # the YAML key and the API keyword: the option's name, or the field's
        given = required.get(leaf.option, leaf.default)
        for key in {leaf.option, leaf.name}:
            config = from_flat(
                cls, {**{k: v for k, v in required.items() if k != leaf.option}, key: given}, exclude=exclude
            )
            value = config
            for part in leaf.path:
                value = getattr(value, part)
            assert value == given, (path, key)
    for param in command.params:  # one default: the help shows the field's
        if param.name not in OWN:
            leaf = next(leaf for leaf in leaves(cls, exclude) if leaf.option == param.opts[0].removeprefix("--"))
            assert leaf.field.metadata["help"] in param.help


@pytest.mark.parametrize("path", sorted(CONFIGURED))
def test_a_commands_saved_settings_run_it_again(path, tmp_path):
    from medlatent.api import load_config
    from medlatent.rundir import write_settings

    cls, exclude = CONFIGURED[path]
    required = {
        leaf.option: "x.csv" if leaf.option == "out" else "x"
        for leaf in leaves(cls, exclude)
        if leaf.field.metadata.get("required")
    }
    config = load_config(None, required, cls, exclude)
    write_settings(tmp_path / "config.yaml", config, exclude)
    assert load_config(tmp_path / "config.yaml", {}, cls, exclude) == config
