"""``lcbench new method NAME`` / ``lcbench new task NAME``: write a working plugin package.

The package is one module (a :class:`~lcbench.methods.base.Stage` or
:class:`~lcbench.tasks.base.Task` subclass that works as written), its entry point, a test that
spawns the real ``lcbench`` on the tiny offline model, and a CI workflow that re-runs committed
baselines with ``lcbench check`` — so a method author goes from nothing to a failing-when-it-should
CI check in minutes. Templates are jinja2 files in ``templates/`` beside this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

KINDS = ("method", "task")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Plugin:
    """What the templates are filled with."""

    kind: str  # "method" or "task"
    name: str  # the registered name, e.g. keep_recent
    lcbench_version: str

    @property
    def module(self) -> str:
        return f"lcbench_{self.name}"

    @property
    def project(self) -> str:
        return "lcbench-" + self.name.replace("_", "-")

    @property
    def class_name(self) -> str:
        return "".join(part.capitalize() for part in self.name.split("_"))


def _files(plugin: Plugin) -> dict[str, str]:
    """Relative path → template name."""
    return {
        "pyproject.toml": f"{plugin.kind}/pyproject.toml.j2",
        f"{plugin.module}.py": f"{plugin.kind}/module.py.j2",
        f"tests/test_{plugin.name}.py": f"{plugin.kind}/test.py.j2",
        "make_baselines.sh": f"{plugin.kind}/make_baselines.sh.j2",
        ".github/workflows/lcbench-check.yml": "common/lcbench-check.yml.j2",
        "README.md": "common/README.md.j2",
    }


def write_plugin(kind: str, name: str, output: Path) -> list[Path]:
    """Write the plugin package for ``kind`` ``name`` into ``output`` (created; must be empty or
    absent). Returns the files written."""
    import jinja2

    import lcbench

    if kind not in KINDS:
        raise UserError(f"`lcbench new {kind}`: choose one of {', '.join(KINDS)}. Fix: lcbench new method my_method.")
    if not _NAME.match(name):
        raise UserError(f"'{name}' cannot name a {kind}: use lower-case letters, digits and '_', starting with a "
                        f"letter (it becomes the registered name and the Python module lcbench_{name}). "
                        f"Fix: e.g. lcbench new {kind} my_{kind}.")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"'{output}' exists and is not an empty folder; lcbench new never overwrites files. "
                        f"Fix: pass another --output folder.")
    registry = _registry(kind)
    if name in registry:
        raise UserError(f"'{name}' is already a registered {kind} (`lcbench ls {kind}s`). Fix: choose another name.")
    plugin = Plugin(kind, name, lcbench.__version__)
    env = jinja2.Environment(loader=jinja2.PackageLoader("lcbench.scaffold", "templates"),
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    written = []
    try:
        for rel, template in _files(plugin).items():
            path = output / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(env.get_template(template).render(p=plugin), encoding="utf-8")
            written.append(path)
    except OSError as exc:
        raise UserError(f"cannot write the plugin into '{output}': {exc.strerror or exc}. "
                        f"Fix: pass a writable --output folder.") from None
    (output / "make_baselines.sh").chmod(0o755)
    return written


def _registry(kind: str):
    if kind == "method":
        from ..methods.registry import METHODS

        return METHODS
    from ..tasks.registry import TASKS

    return TASKS
