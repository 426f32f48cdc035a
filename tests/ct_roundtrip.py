"""Run INSIDE the circuit-tracer 0.5.0 virtualenv by tests/test_circuit_tracer.py (it does not import saecache).

argv[1]: a JSON file with `transcoders` (the exported set's directory, absolute), `model` (the model directory),
`inputs` (safetensors: x_{i} [N, D] at layer i's input hook, y_{i} saecache's reconstruction of layer i's output,
ids [T] a prompt's token ids, logits [T, V] saecache's clean logits for them), `graph_dir` and `slug`.

It loads the set the way a user would (`load_transcoder_from_hub` with the directory: a local directory holding a
config.yaml counts as a cached set), compares circuit-tracer's reconstruction of every layer with saecache's, checks
that this transformers reads the model directory as the same model (logits), builds the nnsight replacement model on
CPU, computes an attribution graph for the prompt and writes its graph files. Prints one JSON line of results.
"""

import json
import os
import sys
import time

import torch
from safetensors.torch import load_file


def main() -> None:
    args = json.load(open(sys.argv[1]))
    t0 = time.time()
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.utils.create_graph_files import create_graph_files
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub
    from transformers import AutoModelForCausalLM

    cpu = torch.device("cpu")
    data = load_file(args["inputs"])
    transcoders, config = load_transcoder_from_hub(args["transcoders"], device=cpu, dtype=torch.float32)
    recon_err = []
    with torch.no_grad():
        for i, tc in enumerate(transcoders):
            x, y = data[f"x_{i}"], data[f"y_{i}"]
            recon_err.append(float(((tc(x) - y).abs() / (1 + y.abs())).max()))
        hf = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32).eval()
        logits = hf(input_ids=data["ids"][None]).logits[0]
        logit_err = float((logits - data["logits"]).abs().max())
        del hf
    model = ReplacementModel.from_pretrained_and_transcoders(args["model"], transcoders, backend="nnsight",
                                                              device=cpu, dtype=torch.float32)
    t1 = time.time()
    graph = attribute(data["ids"], model, max_n_logits=3, desired_logit_prob=0.5, batch_size=64,
                      max_feature_nodes=64)
    t2 = time.time()
    os.makedirs(args["graph_dir"], exist_ok=True)
    graph.to_pt(os.path.join(args["graph_dir"], f"{args['slug']}.pt"))
    create_graph_files(graph_or_path=graph, slug=args["slug"], output_path=args["graph_dir"], node_threshold=0.8,
                       edge_threshold=0.98)
    print(json.dumps({"n_layers": len(transcoders), "config": {k: config.get(k) for k in
                                                               ("model_kind", "feature_input_hook",
                                                                "feature_output_hook")},
                      "recon_err": recon_err, "logit_err": logit_err,
                      "n_active_features": int(graph.active_features.shape[0]),
                      "n_selected_features": int(graph.selected_features.shape[0]),
                      "load_s": t1 - t0, "attribute_s": t2 - t1}))


if __name__ == "__main__":
    main()
