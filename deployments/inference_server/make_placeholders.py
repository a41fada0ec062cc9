"""Write small placeholder model packages for Roboflow's inference server.

Run with the server venv's python:

    python make_placeholders.py OUTDIR

It writes three packages, each a folder named by the model id the server asks
for, so that a server started with OUTDIR as its working directory (and with
ALLOW_INFERENCE_MODELS_DIRECTLY_ACCESS_LOCAL_PACKAGES=True) loads them instead
of downloading weights:

    OUTDIR/clip/ViT-B-16/                        ONNX, 512-d embeddings
    OUTDIR/perception-encoder/PE-Core-L14-336/   torch, 1024-d embeddings
    OUTDIR/owlv2/owlv2-large-patch14-ensemble/   transformers Owlv2, tiny

The packages have the real file layout, input/output signatures and
tokenizers, so every server code path runs for real; the weights are random
and the numbers they produce mean nothing. Output is deterministic (seeded).
"""

import gzip
import json
import math
import os
import sys
from importlib.util import find_spec

import torch
from torch import nn

SEED = 0
CLIP_DIM = 512
CLIP_IMAGE_SIZE = 224
CLIP_CONTEXT_LENGTH = 77
CLIP_VOCAB_SIZE = 49408


def write_model_config(package_dir, architecture, task_type, backend_type):
    # Every inference-models package says which loader reads it.
    os.makedirs(package_dir, exist_ok=True)
    with open(os.path.join(package_dir, "model_config.json"), "w") as f:
        json.dump(
            {
                "model_architecture": architecture,
                "task_type": task_type,
                "backend_type": backend_type,
            },
            f,
            indent=2,
        )


# --------------------------------------------------------------------------
# CLIP: two tiny ONNX graphs with CLIP ViT-B-16's signatures.
# --------------------------------------------------------------------------


class TinyClipVisual(nn.Module):
    """[batch, 3, 224, 224] float -> [batch, 512]: average pool to 4x4, then linear."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(CLIP_IMAGE_SIZE // 4)
        self.proj = nn.Linear(3 * 4 * 4, CLIP_DIM)

    def forward(self, x):
        return self.proj(self.pool(x).flatten(1))


class TinyClipTextual(nn.Module):
    """[batch, 77] int32 CLIP token ids -> [batch, 512]: token embedding, mean, linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(CLIP_VOCAB_SIZE, 16)
        self.proj = nn.Linear(16, CLIP_DIM)

    def forward(self, tokens):
        return self.proj(self.embed(tokens.long()).mean(dim=1))


def export_onnx(module, example, path):
    # Opset 17 with the TorchScript (non-dynamo) exporter: small, self-contained
    # files that onnxruntime loads without extra tooling. The loader reads the
    # image size from the visual input's shape, so only the batch axis is dynamic.
    torch.onnx.export(
        module,
        (example,),
        path,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def make_clip(outdir):
    package_dir = os.path.join(outdir, "clip", "ViT-B-16")
    write_model_config(package_dir, "clip", "embedding", "onnx")
    torch.manual_seed(SEED)
    visual = TinyClipVisual().eval()
    textual = TinyClipTextual().eval()
    with torch.no_grad():
        export_onnx(
            visual,
            torch.zeros(1, 3, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE),
            os.path.join(package_dir, "visual.onnx"),
        )
        # clip.tokenize() hands the server int32 token ids.
        export_onnx(
            textual,
            torch.zeros(1, CLIP_CONTEXT_LENGTH, dtype=torch.int32),
            os.path.join(package_dir, "textual.onnx"),
        )


# --------------------------------------------------------------------------
# Perception Encoder: the real PE code, random init, a patch for broken tensors.
# --------------------------------------------------------------------------

# The directory carries the server's default id; the config names the smallest
# architecture the package knows, whose embeddings are 1024-d like L14-336's.
PE_PACKAGE_NAME = "PE-Core-L14-336"
PE_ARCHITECTURE = "PE-Core-B16-224"


def find_uninitialised_pe_tensors():
    """Build PE like the server does and return the tensors its init leaves broken.

    The server builds the model from random init and then loads model.pt with
    strict=False, so model.pt only has to carry what random init does not set:
    tensors created with torch.empty and never initialised (the text
    positional_embedding and text_projection), which otherwise make text
    embeddings NaN. To find them deterministically, torch.empty is made to
    return NaN-filled tensors while the model is built: whatever is still
    non-finite afterwards was never initialised. Weights (2-D or more) that are
    all zero or huge are included too, as a safety net.
    """
    from inference_models.models.perception_encoder.vision_encoder import pe

    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))

    torch.empty = nan_empty
    try:
        model = pe.CLIP.from_config(PE_ARCHITECTURE, pretrained=False)
    finally:
        torch.empty = real_empty

    broken = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        non_finite = not torch.isfinite(tensor).all()
        degenerate = tensor.dim() >= 2 and (bool((tensor == 0).all()) or float(tensor.abs().max()) > 1e4)
        if non_finite or degenerate:
            broken[name] = (tuple(tensor.shape), tensor.dtype)
    return broken


def make_perception_encoder(outdir):
    package_dir = os.path.join(outdir, "perception-encoder", PE_PACKAGE_NAME)
    write_model_config(package_dir, "perception-encoder", "embedding", "torch")
    with open(os.path.join(package_dir, "config.json"), "w") as f:
        json.dump({"vision_encoder_config": PE_ARCHITECTURE}, f, indent=2)

    broken = find_uninitialised_pe_tensors()
    print(f"perception encoder: fixing {sorted(broken)}", file=sys.stderr)
    generator = torch.Generator().manual_seed(SEED)
    state_dict = {}
    for name in sorted(broken):
        shape, dtype = broken[name]
        # Small random values, scaled like the usual init (normal x dim^-0.5).
        std = shape[-1] ** -0.5
        state_dict[name] = (torch.randn(shape, generator=generator, dtype=torch.float32) * std).to(dtype)
    torch.save(state_dict, os.path.join(package_dir, "model.pt"))


# --------------------------------------------------------------------------
# OWLv2: a tiny transformers Owlv2 with the real CLIP BPE tokenizer.
# --------------------------------------------------------------------------

OWL_IMAGE_SIZE = 320
OWL_PATCH_SIZE = 16  # 320 / 16 = 20 patches a side, 400 in all
# The server keeps the top 300 patches by objectness (torch.topk(k=300)), so
# fewer than 300 patches fails every request with "selected index k out of range".
OWL_BOX_FRACTION = 0.25


def bytes_to_unicode():
    """OpenAI CLIP's byte -> printable unicode map (the base of its BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def clip_bpe_vocab_and_merges():
    """The 49,408-token CLIP vocabulary, built the way OpenAI's tokenizer builds it.

    The merges file ships with rf-clip (installed with the server). transformers 5
    ignores vocab_file=/merges_file= and silently builds a 3-token tokenizer, so
    the vocabulary and merges are passed to CLIPTokenizer as objects instead.
    """
    spec = find_spec("clip")
    bpe_path = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(bpe_path) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    return {token: i for i, token in enumerate(vocab)}, merges


def make_owlv2(outdir):
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    package_dir = os.path.join(outdir, "owlv2", "owlv2-large-patch14-ensemble")
    write_model_config(package_dir, "owlv2", "open-vocabulary-object-detection", "hugging-face")
    text_max_positions = 16
    config = Owlv2Config(
        text_config=dict(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=text_max_positions,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=OWL_IMAGE_SIZE,
            patch_size=OWL_PATCH_SIZE,
        ),
        projection_dim=32,
    )
    torch.manual_seed(SEED)
    model = Owlv2ForObjectDetection(config).eval()

    # A random box head saturates the sigmoid (boxes at 0 or 1 of the image),
    # so no reference box would ever match. Zero its last layer and give it a
    # size bias so that every predicted box is OWL_BOX_FRACTION of the padded
    # image side, centred on its patch: box_bias already adds
    # logit(1 / patches_per_side) to the size, hence s = logit(f) - logit(1/n).
    # A reference box of about a quarter of the longer image side then matches
    # (IoU > 0.3) wherever it is.
    n = OWL_IMAGE_SIZE // OWL_PATCH_SIZE

    def logit(p):
        return math.log(p / (1 - p))

    size_bias = logit(OWL_BOX_FRACTION) - logit(1 / n)
    with torch.no_grad():
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.copy_(torch.tensor([0.0, 0.0, size_bias, size_bias]))
    model.save_pretrained(package_dir)

    vocab, merges = clip_bpe_vocab_and_merges()
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token="!",  # OWLv2's tokenizer pads with "!" (id 0), not <|endoftext|>
        model_max_length=text_max_positions,
    )
    image_processor = Owlv2ImageProcessor(size={"height": OWL_IMAGE_SIZE, "width": OWL_IMAGE_SIZE})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(package_dir)


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUTDIR")
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    torch.manual_seed(SEED)
    make_clip(outdir)
    make_owlv2(outdir)
    make_perception_encoder(outdir)
    print(f"placeholder packages written to {outdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
