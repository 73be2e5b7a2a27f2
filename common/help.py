"""``--help`` that reads at 80 columns, for every command of ``rebuild``, ``rebuild-worker`` and
``rebuild-api``: Typer's own rich help, with what costs width and says nothing taken out.

A flag's type (``<bool>``) says nothing its name does not, and a repeatable option's ``<list[str]>``
is wider than its element's ``<str>`` (the help says it repeats): the option names keep that width, so
Typer never cuts them. Options are grouped by each command in panels (``rich_help_panel``).
"""

from __future__ import annotations

import re
from typing import Any

from typer.core import TyperCommand, TyperGroup, TyperOption

_LIST_OF = re.compile(r"^<list\[(.+)\]>$")


def _narrower(params: list[Any], ctx: Any) -> None:
    for param in params:
        if not isinstance(param, TyperOption) or param.metavar is not None:
            continue
        if param.is_flag:
            param.metavar = ""
        elif (shown := _LIST_OF.match(str(param.display_type_rich(ctx) or ""))) is not None:
            param.metavar = f"<{shown[1]}>"


class HelpCommand(TyperCommand):
    """A command whose ``--help`` shows no ``<bool>`` and repeatable options by their element type."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _narrower(self.get_params(ctx), ctx)
        super().format_help(ctx, formatter)


class HelpGroup(TyperGroup):
    """A command group whose own options are shown as :class:`HelpCommand` shows a command's."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _narrower(self.get_params(ctx), ctx)
        super().format_help(ctx, formatter)
