"""Import paths (`module:attribute` / `module.attribute`): importing what they name, with one-line errors.

Both the CLI (`shoal run`, `shoal build`) and the config schema (`import_path:` in a config file)
resolve import paths, so the rules live here rather than in either: the config schema must not
import the CLI, and the CLI turns `ImportPathError` into its own one-line error.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Any, Optional

from shoal.deployment import Application, Deployment


class ImportPathError(ValueError):
    """An import path that does not lead to an application; its text is one line meant for the user."""


def split_import_path(import_path: str) -> tuple[str, str]:
    """`pkg.module:attr` or `pkg.module.attr` -> (module, attribute path)."""
    if ":" in import_path:
        module, _, attr = import_path.partition(":")
    else:
        module, _, attr = import_path.rpartition(".")
    if not module or not attr or ":" in attr:
        raise ImportPathError(
            f"Invalid import path '{import_path}': expected 'module:attribute' or 'module.attribute'.")
    return module, attr


def _where(e: BaseException) -> str:
    """' (at file:line)' for the innermost frame of an exception raised by user code."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames or isinstance(e, SyntaxError):  # a SyntaxError names its file and line itself
        return ""
    last = frames[-1]
    return f" (at {last.filename}:{last.lineno})"


def describe_error(e: BaseException) -> str:
    """An exception from user code as one line: its type, its text and where it was raised."""
    return f"{type(e).__name__}: {e}{_where(e)}"


def _import_module(module: str, import_path: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        # Only a missing module named by the path itself is "not found"; a missing dependency of
        # the user's module is an error inside that module.
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            raise ImportPathError(
                f"Could not import '{import_path}': module '{module}' not found "
                f"(searched the app dir and the Python path; is --app-dir right?).") from None
        raise ImportPathError(f"Could not import '{import_path}': importing module '{module}' failed: "
                              f"{describe_error(e)}") from None
    except Exception as e:  # noqa: BLE001 - any error in the user's module becomes one clear line
        raise ImportPathError(f"Could not import '{import_path}': importing module '{module}' failed: "
                              f"{describe_error(e)}") from None


def import_attribute(import_path: str, app_dir: Optional[str] = ".") -> Any:
    """Import what `module:attr` / `module.attr` names (attr may be dotted), with `app_dir` first on
    `sys.path` (it stays there, so replicas, which get the driver's `sys.path`, import it too)."""
    if app_dir is not None:
        path = os.path.abspath(app_dir)
        if not os.path.isdir(path):
            raise ImportPathError(f"Could not import '{import_path}': app dir '{app_dir}' is not a directory.")
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
        importlib.invalidate_caches()
    module_name, attr_path = split_import_path(import_path)
    obj: Any = _import_module(module_name, import_path)
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportPathError(f"Could not import '{import_path}': module '{module_name}' has no attribute "
                                  f"'{attr_path}'.") from None
    return obj


def load_application(import_path: str, app_dir: Optional[str] = ".") -> Application:
    """Import `import_path` and turn what it names into an Application.

    The attribute may be an Application (from `.bind()`), a Deployment (bound with no arguments),
    or a builder function called with no arguments that returns an Application.
    """
    obj = import_attribute(import_path, app_dir)
    if isinstance(obj, Application):
        return obj
    if isinstance(obj, Deployment):
        try:
            return obj.bind()
        except Exception as e:  # noqa: BLE001
            raise ImportPathError(f"Could not bind deployment '{import_path}': {describe_error(e)}") from None
    if isinstance(obj, type):
        raise ImportPathError(
            f"'{import_path}' is a class, not an application: decorate it with @serve.deployment and "
            f"point at `{obj.__name__}.bind()` (or at the deployment itself).")
    if callable(obj):
        try:
            built = obj()
        except Exception as e:  # noqa: BLE001
            raise ImportPathError(f"The application builder '{import_path}' failed when called with no "
                                  f"arguments: {describe_error(e)}") from None
        if isinstance(built, Application):
            return built
        raise ImportPathError(f"The application builder '{import_path}' returned {type(built).__name__}, "
                              f"not an Application (from Deployment.bind()).")
    raise ImportPathError(f"'{import_path}' is a {type(obj).__name__}, not an application: expected an "
                          f"Application (from Deployment.bind()), a Deployment, or a builder function.")
