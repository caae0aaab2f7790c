"""Which chat template the host's llama-server is started with: the spec's
`chatTemplate` (a built-in of the pinned build), else the architecture's own for a
model file without `tokenizer.chat_template`, else none; how a profile records
whether its file has one, and the refusals that name what is wrong."""

from __future__ import annotations

import base64
import dataclasses
import json
import zlib
from typing import Any

import pytest
from pydantic import ValidationError

from mesh_operator import planning
from mesh_operator.api.chat_templates import (
    CHAT_TEMPLATES,
    check_chat_template,
    parse_chat_templates,
)
from mesh_operator.api.meshmodel import MeshModelSpec
from mesh_operator.api.owned_flags import owned_flag
from mesh_operator.planner.gguf_header import read_header_file
from mesh_operator.planner.profile import ModelProfile, build_model_profile
from mesh_operator.planner.profile_codec import PREFIX, decode_profile, encode_profile
from tests.unit.planner.llama_log import GEMMA_HEADER, MODEL_HEADERS
from tests.unit.test_planning import PLAN

pytestmark = pytest.mark.unit

# From the pinned `llama-server --help` (b1-0c1e570), the option and its neighbours,
# with long lines cut short.
HELP_EXCERPT = """\
--chat-template-kwargs STRING           sets additional params for the json template parser
                                        (env: LLAMA_ARG_CHAT_TEMPLATE_KWARGS)
--chat-template JINJA_TEMPLATE          set custom jinja chat template (default:
                                        template taken from model's metadata)
                                        if suffix/prefix are specified, template will be disabled
                                        only commonly used templates are accepted
                                        (unless --jinja is set before this flag):
                                        list of built-in templates:
                                        bailing, bailing-think, bailing2, chatglm3,
                                        chatglm4, chatml,
                                        smolvlm, solar-open, vicuna, vicuna-orca, yandex, zephyr
                                        (env: LLAMA_ARG_CHAT_TEMPLATE)
--chat-template-file JINJA_TEMPLATE_FILE
                                        set custom jinja chat template file
                                        list of built-in templates:
                                        other-list-not-read
"""


def test_built_in_names_are_read_from_the_help_of_the_option() -> None:
    assert parse_chat_templates(HELP_EXCERPT) == (
        "bailing", "bailing-think", "bailing2", "chatglm3", "chatglm4", "chatml",
        "smolvlm", "solar-open", "vicuna", "vicuna-orca", "yandex", "zephyr",
    )  # fmt: skip
    assert parse_chat_templates("--ctx-size N   size\n") == ()


def test_the_recorded_list_is_the_pinned_builds() -> None:
    # The generated record; `planning --check-flags` keeps it in step with --help.
    assert {"gemma", "chatml", "llama3", "phi3"} <= set(CHAT_TEMPLATES)
    assert len(set(CHAT_TEMPLATES)) == len(CHAT_TEMPLATES)


def test_every_architecture_default_is_a_built_in() -> None:
    assert set(planning.ARCHITECTURE_CHAT_TEMPLATES.values()) <= set(CHAT_TEMPLATES)


def test_an_unknown_name_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"chatTemplate 'gemma3' is not a built-in template"):
        check_chat_template("gemma3")
    with pytest.raises(ValidationError, match="chatTemplate 'gemma3' is not a built-in"):
        spec(chatTemplate="gemma3")


@pytest.mark.parametrize(
    "extra", [["--jinja"], ["--no-jinja"], ["--chat-template", "x"], ["--chat_template_file=t"]]
)
def test_chat_template_and_extra_args_choosing_one_are_refused(extra: list[str]) -> None:
    with pytest.raises(ValidationError, match="both choose the chat template"):
        spec(chatTemplate="gemma", extraArgs=extra)
    assert spec(extraArgs=extra).template_in_extra_args()


def test_template_flags_stay_open_to_extra_args() -> None:
    # Chosen by the operator only when extraArgs leave the choice to it.
    for item in ("--jinja", "--no-jinja", "--chat-template", "--chat-template-file"):
        assert owned_flag(item) is None


def spec(**extra: Any) -> MeshModelSpec:
    return MeshModelSpec.model_validate(
        {"source": {"url": "https://m.example/m.gguf"}, "poolRef": "p", **extra}
    )


def gemma(has_template: bool) -> ModelProfile:
    profile = build_model_profile(read_header_file(GEMMA_HEADER))
    return dataclasses.replace(profile, has_chat_template=has_template)


def llama(has_template: bool) -> ModelProfile:
    profile = build_model_profile(read_header_file(MODEL_HEADERS / "llama-3.1-8b.header.gguf"))
    return dataclasses.replace(profile, has_chat_template=has_template)


@pytest.mark.parametrize(
    ("case", "model_spec", "profile", "template"),
    [
        ("the spec's, whatever the file", spec(chatTemplate="chatml"), gemma(True), "chatml"),
        ("gemma file without one: gemma's", spec(), gemma(False), "gemma"),
        ("gemma file with one: its own", spec(), gemma(True), None),
        ("no built-in for the architecture", spec(), llama(False), None),
        ("extraArgs choose", spec(extraArgs=["--chat-template-file", "t"]), gemma(False), None),
        ("profile not read", spec(), None, None),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_which_template_the_host_gets(
    case: str, model_spec: MeshModelSpec, profile: ModelProfile | None, template: str | None
) -> None:
    assert planning.chat_template(model_spec, profile) == template, case
    args = planning.llama_args(PLAN, model_spec, "m", None, profile)
    if template is None:
        assert "--chat-template" not in args and "--no-jinja" not in args
    else:
        at = args.index("--chat-template")
        assert args[at + 1] == template
        # The built-in name is read by llama.cpp's own formatter: Jinja off before it.
        assert args[at - 1] == "--no-jinja"


def test_extra_args_follow_the_template_flags() -> None:
    args = planning.llama_args(PLAN, spec(extraArgs=["--temp", "0.2"]), "m", None, gemma(False))
    assert args.index("--chat-template") < args.index("--temp")


def test_a_profile_records_whether_the_file_has_a_template() -> None:
    header = read_header_file(GEMMA_HEADER)
    assert not build_model_profile(header).has_chat_template
    metadata = {**header.metadata, "tokenizer.chat_template": "{{ messages }}"}
    with_template = dataclasses.replace(header, metadata=metadata)
    assert build_model_profile(with_template).has_chat_template


def test_the_codec_carries_the_template_flag_and_reads_older_text_without_it() -> None:
    profile = gemma(False)
    assert not decode_profile(encode_profile(profile)).has_chat_template
    # A profile encoded before the field existed: nothing is chosen in its place.
    older = encode_profile(profile)
    fields = json.loads(zlib.decompress(base64.b64decode(older[len(PREFIX) :])))
    del fields["has_chat_template"]
    text = PREFIX + base64.b64encode(zlib.compress(json.dumps(fields).encode())).decode()
    assert decode_profile(text).has_chat_template
