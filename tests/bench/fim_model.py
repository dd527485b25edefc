"""SmolLM2 with fill-in-the-middle tokens, for the editor workloads (ARCHITECTURE.md "Test models": SmolLM2 has none).

The real SmolLM2 GGUF with three unused special tokens renamed to StarCoder's `<fim_prefix>`,
`<fim_suffix>`, `<fim_middle>` (ids 12-14, the `<jupyter_text|code|output>` tokens): same weights,
same vocabulary size, so its prefill and decode cost exactly what SmolLM2's do. The model was never
trained on FIM, so its completions are poor text; the editor workloads measure time, not quality.
mlx-serve and llama.cpp both find FIM tokens by their text, so both treat this file as FIM-capable.
Built once and cached on disk like the test models. Imports no other harness module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
RENAMED = {
    "<jupyter_text>": FIM_TOKENS[0],
    "<jupyter_code>": FIM_TOKENS[1],
    "<jupyter_output>": FIM_TOKENS[2],
}
FILE_NAME = "smollm2-fim.gguf"


def _copy_renaming_tokens(src: Path, dst: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    assert arch is not None
    writer = gguf.GGUFWriter(dst, arch.contents(), endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        value = field.contents()
        if field.name == gguf.Keys.Tokenizer.LIST:
            missing = set(RENAMED) - set(value)
            if missing:
                raise RuntimeError(f"{src} lacks the tokens to rename: {sorted(missing)}")
            value = [RENAMED.get(token, token) for token in value]
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, val_type, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()


def build_smollm2_fim_gguf(smollm2_gguf: Path, cached_build: Callable[..., Path]) -> Path:
    """The FIM copy of `smollm2_gguf`, built once by tests/models.py's cached_build."""

    def build(out: Path) -> None:
        out.mkdir()
        _copy_renaming_tokens(smollm2_gguf, out / FILE_NAME)

    recipe = {"source": smollm2_gguf.name, "size": smollm2_gguf.stat().st_size, "renamed": RENAMED, "v": 1}
    return cached_build("smollm2-fim-gguf", recipe, build) / FILE_NAME
