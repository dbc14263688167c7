"""Writes reference/cli.md at build time (mkdocs-gen-files) from the command line itself: every
command, its arguments and options with their defaults, ranges and help, as `--help` shows them.
The options derive from the commands' configs (`medlatent.config`), so this page never drifts."""

from __future__ import annotations

import mkdocs_gen_files
import typer

from medlatent.cli import app


def commands(group, prefix: str = "medlatent") -> list[tuple[str, object]]:
    """Every leaf command by its full name, in the CLI's order (typer's click commands: a group has `commands`)."""
    found = []
    for name, command in group.commands.items():
        path = f"{prefix} {name}"
        found += commands(command, path) if hasattr(command, "commands") else [(path, command)]
    return found


def option_row(param) -> str:
    names = " / ".join(f"`{opt}`" for opt in [*param.opts, *param.secondary_opts])
    text = " ".join((getattr(param, "help", None) or "").split()).replace("|", "\\|")
    if getattr(param, "multiple", False):
        text += " Repeatable."
    return f"| {names} | {text} |"


def page() -> str:
    root = typer.main.get_command(app)
    lines = [
        "# Command line",
        "",
        "Every command and option of `medlatent`, as `medlatent COMMAND --help` shows them. Each option is",
        "also a key of the command's `--config` YAML file (the option's name, underscores accepted) and a",
        "keyword of its Python function (`medlatent.api`).",
        "",
    ]
    for path, command in commands(root):
        lines += [f"## `{path}`", "", (command.help or "").strip(), ""]
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        if arguments:
            lines += ["Arguments: " + ", ".join(f"`{(p.metavar or p.name).upper()}`" for p in arguments), ""]
        options = [p for p in command.params if p.param_type_name == "option" and p.name != "help"]
        lines += ["| option | meaning |", "| --- | --- |", *map(option_row, options), ""]
    return "\n".join(lines)


with mkdocs_gen_files.open("reference/cli.md", "w") as f:
    f.write(page())
