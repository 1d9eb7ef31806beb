"""Build hook: the protocol data kept in the top-level ``tasks/`` folder (the
layout DESIGN.md shows) is copied into the package as ``lcbench/_protocol/<kind>/`` when the wheel
is built, so an installed lcbench reads it with ``importlib.resources`` (:func:`lcbench.protocol_file`).
Everything else is declared in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTOCOL_FOLDERS = ("tasks",)
PROTOCOL_SUFFIXES = (".toml", ".json", ".txt")


class BuildPyWithProtocol(build_py):
    """``build_py`` plus ``tasks/*`` → ``<build_lib>/lcbench/_protocol/``."""

    def protocol_files(self):
        root = Path(__file__).resolve().parent
        for kind in PROTOCOL_FOLDERS:
            for src in sorted((root / kind).iterdir()):
                if src.is_file() and src.suffix in PROTOCOL_SUFFIXES:
                    yield src, Path(self.build_lib, "lcbench", "_protocol", kind, src.name)

    def run(self):
        super().run()
        for src, dest in self.protocol_files():
            self.mkpath(str(dest.parent))
            self.copy_file(str(src), str(dest))

    def get_outputs(self, include_bytecode=1):
        return list(super().get_outputs(include_bytecode)) + [str(d) for _, d in self.protocol_files()]


setup(cmdclass={"build_py": BuildPyWithProtocol})
