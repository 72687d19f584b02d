"""Every module of the package imports on its own, first, in a fresh interpreter: no import cycles."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap

import lit_wuerstchen
import lit_wuerstchen.callbacks


def package_modules() -> list[str]:
    names = ["lit_wuerstchen", "lit_wuerstchen.callbacks"]
    for package in (lit_wuerstchen, lit_wuerstchen.callbacks):
        prefix = package.__name__ + "."
        names += [name for _, name, _ in pkgutil.walk_packages(package.__path__, prefix)]
    return sorted(set(names) - {"lit_wuerstchen.__main__"})  # __main__ runs the CLI when imported


# One fresh interpreter imports the third-party libraries once, then forks a child per module: each child starts
# with no lit_wuerstchen module loaded, so the module under test is the first of the package to be imported.
SCRIPT = textwrap.dedent(
    """
    import importlib, os, sys, traceback
    import lightning, open_clip, tensorboard, torch, torchmetrics, torchvision  # noqa: F401
    failures = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            failures.append(name)
    print("FAILED:" + ",".join(failures))
    """
)


def test_every_module_imports_first_in_a_fresh_interpreter():
    modules = package_modules()
    assert {"lit_wuerstchen.checkpoints", "lit_wuerstchen.generation", "lit_wuerstchen.callbacks.ema"} <= set(modules)
    result = subprocess.run([sys.executable, "-c", SCRIPT, *modules], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    failed = result.stdout.strip().splitlines()[-1].removeprefix("FAILED:")
    assert failed == "", f"modules that fail to import on their own: {failed}\n{result.stderr[-3000:]}"


def test_no_generic_top_level_callbacks_package_is_installed():
    """The top-level callbacks/ folder installs as lit_wuerstchen.callbacks, never as a bare `callbacks`."""
    code = "import importlib.util, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
    code += "print(importlib.util.find_spec('callbacks'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "None", result.stdout
    assert lit_wuerstchen.callbacks.__name__ == "lit_wuerstchen.callbacks"
