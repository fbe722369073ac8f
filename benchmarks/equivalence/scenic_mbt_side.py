"""The JAX half of benchmarks/equivalence/mbt.py: runs google-research/scenic's MBT (scenic/projects/mbt) in its own
venv, reading the inputs and weights that the torch half wrote (.npz) and writing scenic's per-layer tokens,
bottlenecks, CLS tokens, logits and training loss back (.npz).

    <venv>/bin/python scenic_mbt_side.py --scenic /tmp/scenic --inputs in.npz --outputs out.npz

Only scenic's model modules are imported. Two imports of theirs are replaced by stand-ins, because no code path
compared here calls them and they would pull in tensorflow / clu: `tensorflow.io.gfile` (vit.py reads checkpoint
files with it) and `clu.parameter_overview` (debug_utils' logging). Everything computed is scenic's code.
"""

from __future__ import annotations

import argparse
import sys
import types


def _stand_ins() -> None:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        tf, io = types.ModuleType("tensorflow"), types.ModuleType("tensorflow.io")
        io.gfile = types.SimpleNamespace()
        tf.io = io
        sys.modules.update({"tensorflow": tf, "tensorflow.io": io})
    try:
        import clu.parameter_overview  # noqa: F401
    except ImportError:
        clu, overview = types.ModuleType("clu"), types.ModuleType("clu.parameter_overview")
        overview.log_parameter_overview = lambda *a, **k: None
        clu.parameter_overview = overview
        sys.modules.update({"clu": clu, "clu.parameter_overview": overview})


def unflatten(flat: dict, prefix: str) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        node = tree
        *path, leaf = key[len(prefix):].split("/")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scenic", required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--outputs", required=True)
    args = p.parse_args()
    sys.path.insert(0, args.scenic)
    _stand_ins()
    import flax
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    from scenic.projects.mbt import model as mbt_model
    from scenic.projects.mbt import model_utils

    jax.config.update("jax_enable_x64", True)
    data = dict(np.load(args.inputs))
    dtype = jnp.float64
    dim, depth, heads, fusion, n_bottleneck, classes, frames = (int(data[k]) for k in (
        "dim", "depth", "heads", "fusion_layer", "num_bottleneck", "num_classes", "num_frames"))
    spec, rgb = data["spectrogram"].astype(np.float64), data["rgb"].astype(np.float64)

    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(
        modality_fusion=("spectrogram", "rgb"), use_bottleneck=True, test_with_bottlenecks=True, share_encoder=False,
        n_bottlenecks=n_bottleneck - 1,  # with the CLS-token classifier scenic adds one: n_bottlenecks + 1 tokens
        fusion_layer=fusion, hidden_size=dim, num_heads=heads, mlp_dim=4 * dim, num_layers=depth,
        representation_size=None, classifier="token", attention_dropout_rate=0.0, dropout_rate=0.0,
        stochastic_droplayer_rate=0.0))
    config.model.patches = ml_collections.ConfigDict(dict(size=[16, 16]))
    config.model.attention_config = ml_collections.ConfigDict(dict(type="spacetime"))
    config.model.temporal_encoding_config = ml_collections.ConfigDict(dict(method="temporal_sampling",
                                                                           n_sampled_frames=frames))
    config.model_dtype_str = "float64"
    config.dataset_configs = ml_collections.ConfigDict(dict(spec_shape=(spec.shape[1], spec.shape[2]),
                                                            num_spec_frames=1, num_frames=frames))
    config.init_from = ml_collections.ConfigDict(dict(restore_positional_embedding=True, restore_input_embedding=True,
                                                      positional_embed_size_change="resize_tile"))
    model = mbt_model.MBTMultilabelClassificationModel(config, {"num_classes": classes, "target_is_onehot": True})
    flax_model = model.flax_model
    inputs = {"spectrogram": jnp.asarray(spec, dtype), "rgb": jnp.asarray(rgb, dtype)}
    params = flax.core.unfreeze(flax_model.init(jax.random.PRNGKey(0), dict(inputs), train=False)["params"])

    # The user's path: scenic's initialise_from_train_state with a ViT checkpoint (the torch half's timm ViT, in
    # scenic's ViT parameter tree; restored_model_cfg says it has a CLS token).
    @flax.struct.dataclass
    class Optimizer:
        target: dict

    @flax.struct.dataclass
    class TrainState:
        optimizer: Optimizer

    vit = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), unflatten(data, "vit/"))
    restored_cfg = ml_collections.ConfigDict({"model": {"classifier": "token", "representation_size": None}})
    state = model_utils.initialise_from_train_state(config, TrainState(Optimizer(params)),
                                                    TrainState(Optimizer(vit)), restored_cfg,
                                                    restore_output_proj=False, log_initialised_param_shapes=False)
    params = flax.core.unfreeze(state.optimizer.target)
    scenic_bottleneck = np.asarray(params["bottleneck"])
    # What the torch model draws instead of loading (named in docs/benchmarks.md): the bottleneck (paper: N(0, 0.02);
    # scenic copies the resized ViT positions into it) and the new classifier (scenic: zeros).
    params["bottleneck"] = jnp.asarray(data["bottleneck"], dtype)
    params["output_projection"] = {"kernel": jnp.asarray(data["head_kernel"], dtype),
                                   "bias": jnp.asarray(data["head_bias"], dtype)}
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)

    logits, state = flax_model.apply({"params": params}, dict(inputs), train=False, capture_intermediates=True,
                                     mutable=["intermediates"])
    inter = state["intermediates"]["Transformer"]
    out = {"logits": np.asarray(logits), "scenic_bottleneck_init": scenic_bottleneck}
    t_spec = spec.shape[1] // 16 * (spec.shape[2] // 16) + 1
    t_rgb = frames * (rgb.shape[2] // 16) * (rgb.shape[3] // 16) + 1
    for i in range(depth):
        ya = np.asarray(inter[f"encoderblock_{i}_spectrogram"]["__call__"][0])
        yv = np.asarray(inter[f"encoderblock_{i}"]["__call__"][0])
        out[f"layer{i}/audio"], out[f"layer{i}/video"] = ya[:, :t_spec], yv[:, :t_rgb]
        if i >= fusion:
            out[f"layer{i}/bottleneck"] = (ya[:, t_spec:] + yv[:, t_rgb:]) / 2
    encoded = np.asarray(inter["__call__"][0])  # encoder_norm(concat(spectrogram tokens, rgb tokens))
    out["cls/audio"], out["cls/video"] = encoded[:, 0], encoded[:, t_spec]

    # The training loss of the recipe: train-mode logits per CLS token, scenic's loss_function (sigmoid CE summed
    # over classes, averaged over the batch, the tokens' losses averaged); no mixup, so both take the labels.
    train_logits = flax_model.apply({"params": params}, dict(inputs), train=True,
                                    rngs={"dropout": jax.random.PRNGKey(1)})
    label = jnp.asarray(data["label"], dtype)
    out["loss"] = np.asarray(model.loss_function(train_logits, {"label": {"spectrogram": label, "rgb": label}}))
    np.savez(args.outputs, **out)


if __name__ == "__main__":
    main()
