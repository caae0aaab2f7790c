"""The chat templates built into the pinned llama-server, which a MeshModel may name.

A base model's file often carries no `tokenizer.chat_template`; llama-server then
formats chats with ChatML, whose `<|im_start|>` markers such a model has never
seen. A built-in template is picked by name (`--chat-template NAME`); the names
are those the pinned build's `--help` lists, recorded in the generated
`llama_server_options.CHAT_TEMPLATES` (`python -m mesh_operator.planning
--write-flags`). The built-in templates are llama.cpp's own formatting, not Jinja:
with Jinja on (its default) llama-server would render a name as a template whose
text is the name, so the name goes with `--no-jinja`.
"""

from __future__ import annotations

import re
from typing import Final

from mesh_operator.api.llama_server_options import CHAT_TEMPLATES

__all__ = ["CHAT_TEMPLATES", "check_chat_template", "parse_chat_templates"]

_LIST_START: Final = "list of built-in templates:"
_OPTION: Final = re.compile(r"^-")


def parse_chat_templates(help_text: str) -> tuple[str, ...]:
    """The built-in template names `--chat-template` lists in llama-server's `--help`.

    The list follows the option's line, indented, after "list of built-in
    templates:", comma-separated over several lines, up to the `(env: ...)` line.
    """
    names: list[str] = []
    in_option = in_list = False
    for line in help_text.splitlines():
        if _OPTION.match(line):
            if in_list:
                break
            in_option = line.split()[0] == "--chat-template"
            continue
        text = line.strip()
        if not in_option:
            continue
        if not in_list:
            in_list = text == _LIST_START
            continue
        if text.startswith("(env:") or not text:
            break
        names += [n.strip() for n in text.split(",") if n.strip()]
    return tuple(names)


def check_chat_template(name: str) -> str:
    """`name` if the pinned llama-server has such a built-in template; else ValueError."""
    if name not in CHAT_TEMPLATES:
        raise ValueError(
            f"chatTemplate {name!r} is not a built-in template of the pinned llama-server "
            f"(one of: {', '.join(CHAT_TEMPLATES)})"
        )
    return name
