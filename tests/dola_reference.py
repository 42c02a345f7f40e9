"""Run under transformers 4.46.3 (``PYTHONPATH=<overlay>``): greedy DoLa generation of a saved
LlamaForCausalLM from given input embeddings, with transformers' own ``generate(dola_layers=...)``;
writes the new tokens as JSON. Used by tests/test_dola.py; no vsink import."""

import json
import sys

import torch
import transformers
from transformers import LlamaForCausalLM


def main(model_dir: str, inputs_path: str, out_path: str) -> None:
    assert transformers.__version__ == "4.46.3", transformers.__version__
    spec = torch.load(inputs_path, weights_only=True)
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    results = {}
    for name, case in spec["cases"].items():
        with torch.no_grad():
            out = model.generate(inputs_embeds=spec["embeds"][case["rows"]], attention_mask=spec["mask"][case["rows"]],
                                 dola_layers=case["layers"], max_new_tokens=spec["max_new_tokens"], do_sample=False,
                                 repetition_penalty=1.0, pad_token_id=0)
        results[name] = out.tolist()
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
