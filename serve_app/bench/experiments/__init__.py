"""Experiments measured with `clip-bench compare --import-path ...`: proposed service changes, not the service."""

from typing import Any


def build_app_with(args: Any, deployment: str, func_or_class: Any) -> Any:
    """The service's own `build_app`, with the deployment `serve_app.app.<deployment>` (e.g. "ClipEncoder")
    running `func_or_class` instead, with the same options."""
    import serve_app.app as app_module

    original = getattr(app_module, deployment)
    setattr(app_module, deployment, original.options(func_or_class=func_or_class))
    try:
        return app_module.build_app(args)
    finally:
        setattr(app_module, deployment, original)
