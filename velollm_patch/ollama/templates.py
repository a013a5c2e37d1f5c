"""Jinja rendering for the files this package writes (Modelfiles, service overrides, env files).

The templates live in the top-level ``templates/`` directory; :func:`resource_dir` finds it in
a checkout and inside an installed package alike.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jinja2

from velollm_patch.paths import resource_dir


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(resource_dir("templates")),
        # Only the plist is markup; every other output is a config format where HTML escaping
        # would corrupt values, and those values are quoted by the callers' own rules.
        autoescape=jinja2.select_autoescape(enabled_extensions=("plist.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_template(name: str, **context: Any) -> str:
    return _environment().get_template(name).render(**context)
