"""MkDocs hook: the docstrings' Sphinx roles as links in the API reference.

The docstrings use Sphinx's roles (``:class:`~actionpool.Report```), which mkdocstrings
shows as written. This turns each into a cross-reference that mkdocs-autorefs resolves
where the target is documented (optional: a plain code span otherwise), with Sphinx's
``~`` meaning "show the last name only".
"""

from __future__ import annotations

import html
import re
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|data|exc|obj):<code>(~?)([^<]+)</code>")


def _link(m: re.Match[str]) -> str:
    short, target = m.group(1), html.unescape(m.group(2)).strip()
    shown = target.rsplit(".", 1)[-1] if short else target
    shown = html.escape(shown)
    if target.startswith(".") or "." not in target:
        return f"<code>{shown}</code>"  # relative or bare: nothing to resolve it against
    return f'<autoref identifier="{html.escape(target)}" optional><code>{shown}</code></autoref>'


def on_page_content(html_text: str, **kwargs: Any) -> str:
    return _ROLE.sub(_link, html_text)
