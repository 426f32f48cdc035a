"""Run INSIDE the circuit-tracer 0.5.0 virtualenv by tests/test_circuit_tracer.py (it does not import saecache).

argv[1]: a JSON file with `sets` ({slug: the exported directory, absolute}: a PLT set, a CLT), `model` (the model
directory), `inputs` (safetensors: x_{i} [N, D] at layer i's input hook, {slug}_y_{i} saecache's reconstruction of
layer i's output by that set, ids [T] a prompt's token ids, logits [T, V] saecache's clean logits for them) and
`graph_dir`.

Per set, it loads it the way a user would (`load_transcoder_from_hub` with the directory: a local directory holding a
config.yaml counts as a cached set), compares circuit-tracer's reconstruction of every layer with saecache's, builds
the nnsight replacement model on CPU, computes an attribution graph for the prompt and writes its graph files (named
by the slug). It also checks that this transformers reads the model directory as the same model (logits). Prints one
JSON line of results.
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
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32).eval()
        logits = hf(input_ids=data["ids"][None]).logits[0]
        results = {"logit_err": float((logits - data["logits"]).abs().max())}
        del hf
    os.makedirs(args["graph_dir"], exist_ok=True)
    for slug, path in args["sets"].items():
        t1 = time.time()
        transcoders, config = load_transcoder_from_hub(path, device=cpu, dtype=torch.float32)
        n_layers = transcoders.n_layers
        xs = [data[f"x_{i}"] for i in range(n_layers)]
        with torch.no_grad():
            if config["model_kind"] == "cross_layer_transcoder":  # all layers at once: [L, N, D]
                ys = list(transcoders(torch.stack(xs)).unbind(0))
            else:
                ys = [tc(x) for tc, x in zip(transcoders, xs)]
        recon_err = [float(((y - data[f"{slug}_y_{i}"]).abs() / (1 + data[f"{slug}_y_{i}"].abs())).max())
                     for i, y in enumerate(ys)]
        model = ReplacementModel.from_pretrained_and_transcoders(args["model"], transcoders, backend="nnsight",
                                                                  device=cpu, dtype=torch.float32)
        t2 = time.time()
        graph = attribute(data["ids"], model, max_n_logits=3, desired_logit_prob=0.5, batch_size=64,
                          max_feature_nodes=64)
        t3 = time.time()
        graph.to_pt(os.path.join(args["graph_dir"], f"{slug}.pt"))
        create_graph_files(graph_or_path=graph, slug=slug, output_path=args["graph_dir"], node_threshold=0.8,
                           edge_threshold=0.98)
        results[slug] = {"n_layers": n_layers, "recon_err": recon_err,
                         "config": {k: config.get(k) for k in ("model_kind", "feature_input_hook",
                                                               "feature_output_hook")},
                         "n_active_features": int(graph.active_features.shape[0]),
                         "n_selected_features": int(graph.selected_features.shape[0]),
                         "load_s": round(t2 - t1, 1), "attribute_s": round(t3 - t2, 1)}
        del model, graph, transcoders
    results["total_s"] = round(time.time() - t0, 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
