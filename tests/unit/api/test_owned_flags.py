"""The llama-server flags extraArgs may not set: every spelling of the operator's own."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from mesh_operator import planning
from mesh_operator.api import llama_server_options
from mesh_operator.api.meshmodel import MeshModelSpec
from mesh_operator.api.owned_flags import (
    DEFAULTS_RELIED_ON,
    OWNED_FLAGS,
    owned_flag,
    owned_flags_pattern,
    parse_help,
)

# Lines of the pinned llama-server's `--help`, as it prints them.
HELP_EXCERPT = """\
----- common params -----

-t,    --threads N                      number of CPU threads to use during generation (default: -1)
                                        (env: LLAMA_ARG_THREADS)
-kvo,  --kv-offload, -nkvo, --no-kv-offload
                                        whether to enable KV cache offloading (default: enabled)
                                        (env: LLAMA_ARG_KV_OFFLOAD)
-ot,   --override-tensor <tensor name pattern>=<buffer type>,...
                                        override tensor buffer type
                                        (env: LLAMA_ARG_OVERRIDE_TENSOR)
--spec-draft-ngl, -ngld, --gpu-layers-draft, --n-gpu-layers-draft N
                                        max. number of draft model layers to store in VRAM, either an exact
                                        number, 'auto', or 'all' (default: auto)
-a,    --alias STRING                   set model name aliases, comma-separated (to be used by API)
                                        (env: LLAMA_ARG_ALIAS)
"""  # noqa: E501


@pytest.mark.unit
def test_help_lines_give_every_spelling_of_each_option() -> None:
    assert parse_help(HELP_EXCERPT) == (
        ("-t", "--threads"),
        ("-kvo", "--kv-offload", "-nkvo", "--no-kv-offload"),
        ("-ot", "--override-tensor"),
        ("--spec-draft-ngl", "-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft"),
        ("-a", "--alias"),
    )


@pytest.mark.unit
def test_the_record_holds_what_the_builders_set_now() -> None:
    assert planning.main(["--check-flags"]) == 0, (
        "run python -m mesh_operator.planning --write-flags"
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    "flag", sorted({*llama_server_options.OPERATOR_FLAGS, *DEFAULTS_RELIED_ON})
)
def test_each_owned_flag_is_an_option_of_the_pinned_llama_server(flag: str) -> None:
    assert any(flag in option for option in llama_server_options.OPTIONS)


def _spellings_of_emitted_flags() -> list[str]:
    emitted = planning.operator_llama_flags()
    return sorted(
        {s for option in llama_server_options.OPTIONS if emitted & set(option) for s in option}
    )


@pytest.mark.unit
@pytest.mark.parametrize("spelling", _spellings_of_emitted_flags())
@pytest.mark.parametrize("form", ["{f}", "{f} 8", "{f}=8"])
def test_every_spelling_of_every_emitted_flag_is_refused(spelling: str, form: str) -> None:
    item = form.format(f=spelling)
    with pytest.raises(ValidationError, match=f"extraArgs may not set {re.escape(item)}"):
        MeshModelSpec.model_validate(
            {"source": {"url": "https://m/a.gguf"}, "poolRef": "p", "extraArgs": [item]}
        )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("item", "flag"),
    [
        ("-t", "-t"),
        ("--threads 8", "--threads"),
        ("--ctx_size", "--ctx-size"),
        ("--n_gpu_layers=3", "--n-gpu-layers"),
        ("-ngld", "-ngld"),
        ("-ub", "-ub"),
        ("--spec-draft-n-max", "--spec-draft-n-max"),
        ("-hfr", "-hfr"),
        # llama-server reads neither glued short flags nor `_` in short ones.
        ("-t8", None),
        ("-n_gl", None),
        ("--threads-batch", None),
        ("-tb", None),
        ("--pooling", None),
        ("--temp", None),
        ("0.7", None),
        ("--TEMP", None),
    ],
)
def test_owned_flag_of_an_item(item: str, flag: str | None) -> None:
    assert owned_flag(item) == flag


@pytest.mark.unit
def test_the_crd_pattern_refuses_what_python_refuses() -> None:
    pattern = re.compile(owned_flags_pattern())
    items = [
        form.format(f=spelling)
        for option in llama_server_options.OPTIONS
        for alias in option
        for spelling in (alias, alias.replace("-", "_").replace("__", "--", 1))
        for form in ("{f}", "{f} 1", "{f}=1", "{f}1", "x{f}")
    ]
    disagree = [i for i in items if bool(pattern.match(i)) != (owned_flag(i) is not None)]
    assert disagree == []
    assert any(owned_flag(i) for i in items)


@pytest.mark.unit
def test_an_embeddings_pooling_stays_the_users_to_choose() -> None:
    assert "--pooling" not in OWNED_FLAGS


# -- against the pinned llama-server ----------------------------------------------


@pytest.mark.integration
def test_the_record_matches_the_pinned_llama_server(llama_server_bin: Path) -> None:
    assert planning.main(["--check-flags", "--llama-server", str(llama_server_bin)]) == 0, (
        "run python -m mesh_operator.planning --write-flags --llama-server PATH"
    )


def _parses(binary: Path, *args: str) -> bool:
    """Whether llama-server takes `args` (then `--version` stops it before loading)."""
    result = subprocess.run(
        [str(binary), *args, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    return "invalid argument" not in result.stderr


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "taken"),
    [
        (["--threads", "2"], True),
        (["--ctx_size", "128"], True),
        (["--threads=2"], False),
        (["-t2"], False),
        (["--threads 2"], False),
        (["-n_gl", "1"], False),
    ],
)
def test_the_spellings_llama_server_reads(
    llama_server_bin: Path, args: list[str], taken: bool
) -> None:
    assert _parses(llama_server_bin, *args) is taken
