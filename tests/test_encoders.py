"""Encoder API on tiny random-init configs: shapes, preprocessing, freezing, save/load."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mim_rec.config import ConfigError
from mim_rec.data.errors import DataError, ManifestMismatch
from mim_rec.encoders import (EncoderPair, VisionConfig, build_text_encoder,
                              build_vision_encoder, load_encoders, save_encoders)
from mim_rec.encoders.config import check_normalisation
from mim_rec.encoders.preprocess import decode_image
from tests.encoder_fixtures import (TINY_TEXT, image_in, png_bytes, png_declaring, tiny_encoders, tiny_text,
                                   tiny_vision)

torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["convnext_atto", "vit_tiny_patch16_224",
                                  "eva02_tiny_patch14_224"])
def test_timm_families_preprocess_and_pool(name):
    encoder = build_vision_encoder(tiny_vision(name))
    array = np.zeros((50, 40, 3), dtype=np.uint8)
    pixels = encoder.preprocess([png_bytes(0, 0), array])
    side = tiny_vision(name).image_size
    assert pixels.shape == (2, 3, side, side)
    features = encoder(pixels)
    assert features.shape == (2, encoder.feature_dim)
    assert torch.isfinite(features).all()


def test_preprocess_normalises_with_configured_stats():
    encoder = build_vision_encoder(tiny_vision(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]))
    white = np.full((32, 32, 3), 255, dtype=np.uint8)
    assert torch.allclose(encoder.preprocess([white]), torch.full((1, 3, 32, 32), 2.0))


def test_sixteen_bit_greyscale_png_keeps_its_tones():
    """PIL's own RGB conversion clipped 16-bit grey at 255: a mid-grey photo decoded white."""
    grey = np.full((8, 8), 32768, dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode.startswith("I")
    assert (np.asarray(decode_image(buffer.getvalue())) == 128).all()


def test_corrupt_image_is_reported_with_row_and_field():
    encoder = build_vision_encoder(tiny_vision())
    with pytest.raises(DataError, match=r"items.parquet, row 7, field 'image'.*decodable"):
        encoder.preprocess([png_bytes(0, 0), b"garbage"], source="items.parquet", rows=[3, 7])
    with pytest.raises(DataError, match="empty image"):
        encoder.preprocess([b""])


@pytest.mark.parametrize("image, reason", [
    # PIL's DecompressionBombError escaped, a traceback without the row
    (png_declaring(100_000, 100_000), r"image too large: it declares 10000000000 pixels, over the limit of"),
    (image_in("GIF"), r"image is GIF, not PNG/JPEG"),  # decoded before, though the contract is PNG/JPEG
], ids=["bomb", "gif"])
def test_an_image_too_large_or_not_png_jpeg_is_refused_with_row_and_field(image, reason):
    encoder = build_vision_encoder(tiny_vision())
    with pytest.raises(DataError, match=rf"items.parquet, row 7, field 'image': {reason}"):
        encoder.preprocess([png_bytes(0, 0), image], source="items.parquet", rows=[3, 7])


def test_precomputed_vision_checks_vectors():
    encoder = build_vision_encoder(VisionConfig(name="precomputed", feature_dim=4))
    features = encoder.preprocess([[1, 2, 3, 4], np.ones(4, dtype=np.float32)])
    assert torch.equal(encoder(features), features)
    with pytest.raises(DataError, match="row 1, field 'image_feature'.*shape"):
        encoder.preprocess([[1, 2, 3, 4], [1, 2]])
    with pytest.raises(DataError, match="NaN"):
        encoder.preprocess([[1, 2, float("nan"), 4]])


def test_both_towers_name_the_column_their_caller_read():
    """The precomputed tower named every refused vector 'image_feature', and the pixel tower every
    refused image 'image', whatever column they came from (a pairs file's query_feature)."""
    features = build_vision_encoder(VisionConfig(name="precomputed", feature_dim=4))
    for vectors, reason in (([None], "missing"), ([[1, 2]], "shape"), ([[1, 2, float("nan"), 4]], "NaN")):
        with pytest.raises(DataError, match=f"pairs.parquet, row 5, field 'query_feature': .*{reason}"):
            features.preprocess(vectors, source="pairs.parquet", rows=[5], field="query_feature")
    with pytest.raises(DataError, match=r"pairs.parquet, row 5, field 'query_image': .*decodable"):
        build_vision_encoder(tiny_vision()).preprocess([b"garbage"], source="pairs.parquet", rows=[5],
                                                       field="query_image")


def test_text_mean_pooling_ignores_padding():
    encoder = build_text_encoder(tiny_text()).eval()
    alone = encoder(["red square"])
    padded = encoder(["red square", "a much longer title that forces padding of the first"])
    assert alone.shape == (1, 32)
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-5)


def test_partial_freezing_trains_only_the_tail():
    vision = build_vision_encoder(tiny_vision(trainable_groups=1)).train()
    frozen = [n for n, p in vision.named_parameters() if not p.requires_grad]
    trained = [n for n, p in vision.named_parameters() if p.requires_grad]
    assert any(n.startswith("backbone.stem") for n in frozen)
    assert any(n.startswith("backbone.stages.3") or n.startswith("backbone.head")
               for n in trained)
    assert not vision.backbone.stem[1].training  # frozen modules stay in eval mode
    text = build_text_encoder(tiny_text(trainable_layers=1)).train()
    names = {n for n, p in text.named_parameters() if p.requires_grad}
    assert any(".layer.1." in n for n in names)
    assert not any(".layer.0." in n or "embeddings" in n for n in names)


@pytest.mark.parametrize("pinned", [True, False])
def test_batchnorm_eval_keeps_running_statistics_while_weights_train(pinned):
    config = VisionConfig(name="efficientnet_lite0", weights=None, image_size=32, batchnorm_eval=pinned)
    vision = build_vision_encoder(config).train()
    norms = [m for m in vision.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    tail = norms[-1]  # in the trainable head, not the frozen prefix
    before = tail.running_mean.clone()
    vision(torch.randn(4, 3, 32, 32)).sum().backward()
    assert tail.weight.grad is not None  # the affine weights train either way
    assert torch.equal(tail.running_mean, before) == pinned
    assert all(not m.training for m in norms) == pinned


def test_gradient_checkpointing_keeps_outputs():
    torch.manual_seed(0)
    plain = build_vision_encoder(tiny_vision("vit_tiny_patch16_224"))
    checkpointed = build_vision_encoder(tiny_vision("vit_tiny_patch16_224",
                                                    grad_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(pixels), checkpointed(pixels))


def test_save_and_load_round_trip(tmp_path):
    pair = EncoderPair(tiny_encoders(shared_dim=8)).eval()
    pixels = pair.vision.preprocess([png_bytes(1, 2)])
    before_img, before_txt = pair.embed_images(pixels), pair.embed_titles(["green dot"])
    save_encoders(tmp_path / "enc", pair)
    loaded = load_encoders(tmp_path / "enc").eval()
    torch.testing.assert_close(loaded.embed_images(loaded.vision.preprocess([png_bytes(1, 2)])),
                               before_img)
    torch.testing.assert_close(loaded.embed_titles(["green dot"]), before_txt)
    assert before_img.norm(dim=-1).sub(1).abs().max() < 1e-5


def test_a_tower_on_the_bundled_weights_reloads_in_the_same_architecture(tmp_path):
    """The bundled weights need TF padding, which only ``weights=bundled`` selects; a reload
    starts from random weights, so it must be told, or it computes other features."""
    config = tiny_encoders(shared_dim=8, name="efficientnet_lite0", weights="bundled")
    pair = EncoderPair(config).eval()
    pixels = pair.vision.preprocess([png_bytes(1, 2)])
    with torch.no_grad():
        before = pair.embed_images(pixels)
    save_encoders(tmp_path / "enc", pair)
    loaded = load_encoders(tmp_path / "enc").eval()
    with torch.no_grad():
        assert torch.equal(loaded.embed_images(loaded.vision.preprocess([png_bytes(1, 2)])), before)


def test_saving_the_same_weights_writes_the_same_folder(tmp_path):
    """The tokenizer's file kept the padding and truncation of its last call: a finished
    ``mim pretrain`` run again (nothing tokenized) wrote other bytes, so the encoders'
    fingerprint changed and every MM table built from them was refused."""
    pair = EncoderPair(tiny_encoders(shared_dim=8)).eval()
    save_encoders(tmp_path / "before", pair)
    pair.embed_titles(["green dot", "a much longer red square title"])
    save_encoders(tmp_path / "after", pair)
    from mim_rec.data.manifest import fingerprint_tree

    assert fingerprint_tree(tmp_path / "before") == fingerprint_tree(tmp_path / "after")


def test_damaged_weights_are_one_line_errors_naming_the_file(tmp_path):
    """A weights.pt cut short, or one of another model, was torch's traceback in every stage
    that loads an encoders folder (C-SFT, the MM table build)."""
    save_encoders(tmp_path / "enc", EncoderPair(tiny_encoders(shared_dim=8)))
    weights = tmp_path / "enc" / "weights.pt"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match="unreadable weights") as info:
        load_encoders(tmp_path / "enc")
    assert info.value.file == str(weights) and "\n" not in str(info.value)
    torch.save({"other": torch.zeros(2)}, weights)
    with pytest.raises(ManifestMismatch, match="its tensors are not the encoders its manifest describes "
                                               r"\(Missing key\(s\) in state_dict") as caught:
        load_encoders(tmp_path / "enc")
    assert "\n" not in str(caught.value)


def test_a_foreign_vision_weights_file_is_one_line_without_torchs_advice(tmp_path):
    """Random bytes gave torch's six-line message, which advises turning off weights_only."""
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="not a torch state dict file") as info:
        build_vision_encoder(dataclasses.replace(tiny_vision(), weights=str(tmp_path / "noise.pth")))
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
    assert str(info.value).endswith("(UnpicklingError: Unsupported operand 0)")


def test_a_text_model_with_damaged_weights_is_a_one_line_error(tmp_path):
    """A model.safetensors cut short was a SafetensorError traceback."""
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)).save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    with pytest.raises(ConfigError, match="encoders.text.name=.*bert: its weights cannot be read") as info:
        build_text_encoder(tiny_text(name=str(folder), overrides={}, pretrained=True))
    assert "\n" not in str(info.value)


def _tiny_bert(vocab_size: int = 30522):
    """A tiny random BERT, to save as a local Hugging Face model folder."""
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=vocab_size, **TINY_TEXT))


def test_a_half_precision_text_folder_loads_as_float32(tmp_path):
    """transformers loads a folder in the dtype it was saved in: an fp16 checkpoint gave an
    fp16 text tower, and the fp32 projection head failed at the first title on a dtype clash."""
    _tiny_bert().half().save_pretrained(tmp_path / "bert")
    text = tiny_text(name=str(tmp_path / "bert"), overrides={}, pretrained=True)
    pair = EncoderPair(dataclasses.replace(tiny_encoders(shared_dim=8), text=text)).eval()
    assert {p.dtype for p in pair.text.parameters()} == {torch.float32}
    assert pair.embed_titles(["red shirt"]).dtype == torch.float32


@pytest.mark.parametrize("layout", ["vocab.txt", "tokenizer.json"])
def test_a_model_folder_without_tokenizer_config_keeps_its_own_tokenizer(tmp_path, layout):
    """Only a tokenizer_config.json counted as the folder's tokenizer: a folder with just a
    vocab.txt (original BERT checkpoints) or tokenizer.json was tokenised with the bundled
    MiniLM vocabulary, whose ids mean other tokens to the model."""
    from transformers import AutoTokenizer

    folder = tmp_path / "bert"
    _tiny_bert(vocab_size=7).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "shirt"]))
    if layout == "tokenizer.json":
        AutoTokenizer.from_pretrained(str(folder)).save_pretrained(folder)
        (folder / "vocab.txt").unlink()
        (folder / "tokenizer_config.json").unlink()
    encoder = build_text_encoder(tiny_text(name=str(folder), overrides={}, pretrained=True))
    assert encoder.tokenize(["red shirt"])["input_ids"].tolist() == [[2, 5, 6, 3]]
    (folder / layout).unlink()  # a folder with no tokenizer at all is tokenised with the bundled one
    bundled = build_text_encoder(tiny_text(name=str(folder), overrides={"vocab_size": 30522}))
    assert bundled.tokenizer.vocab_size == 30522


def test_a_model_folders_unreadable_tokenizer_names_the_model_setting(tmp_path):
    """Without a tokenizer_config.json beside it, a damaged tokenizer.json was passed over and
    the bundled vocabulary used in its place."""
    _tiny_bert(vocab_size=7).save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="encoders.text.name=.*bert: not a tokenizer folder"):
        build_text_encoder(tiny_text(name=str(tmp_path / "bert"), overrides={}, pretrained=True))


def test_the_bundled_vision_file_by_its_path_keeps_its_own_preprocessing():
    """Given by path instead of as 'bundled', the same file got timm's ImageNet statistics."""
    from mim_rec.encoders.bundled import bundled_vision_weights

    bundled = bundled_vision_weights("efficientnet_lite0")
    encoder = build_vision_encoder(VisionConfig(weights=str(bundled.state_dict_path), image_size=32))
    mean, std = encoder.image_processor.stats
    assert mean == pytest.approx(bundled.mean) and std == pytest.approx(bundled.std)


def test_load_refuses_other_artifacts(tmp_path):
    with pytest.raises(ManifestMismatch):
        load_encoders(tmp_path)


def test_unknown_names_are_clear_errors():
    with pytest.raises(ConfigError, match="encoders.text.name=no-such-model: unknown text model"):
        build_text_encoder(tiny_text(name="no-such-model"))
    with pytest.raises(ConfigError, match="encoders.vision.weights=bundled: no bundled weights"):
        build_vision_encoder(VisionConfig(name="convnext_atto", weights="bundled"))


def _not_a_state_dict(tmp_path):
    (tmp_path / "junk.pt").write_text("hello")
    return str(tmp_path / "junk.pt")


@pytest.mark.parametrize("changes, message", [  # each was a traceback from torch, timm or transformers
    (lambda tmp: dict(weights=str(tmp / "none.pt")), r"encoders.vision.weights=.*none.pt: no such file"),
    (lambda tmp: dict(weights=_not_a_state_dict(tmp)), r"encoders.vision.weights=.*junk.pt: not a torch state dict"),
    (lambda tmp: dict(name="nonexistent_arch"), "encoders.vision.name=nonexistent_arch: not a timm architecture"),
    (lambda tmp: dict(model_kwargs={"dimz": 3}), "encoders.vision.model_kwargs=.*unexpected keyword argument 'dimz'"),
    (lambda tmp: dict(image_size=16), "encoders.vision.image_size=16: ConvNeXt cannot take 16x16 images"),
], ids=["missing-weights", "junk-weights", "arch", "model_kwargs", "image_size"])
def test_bad_vision_settings_name_the_field(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        build_vision_encoder(dataclasses.replace(tiny_vision(), **changes(tmp_path)))


@pytest.mark.parametrize("changes, message", [
    (lambda tmp: dict(name=str(tmp / "none")), "encoders.text.name=.*none: unknown text model"),
    (lambda tmp: dict(tokenizer=str(tmp / "none")), "encoders.text.tokenizer=.*none: no such folder"),
    (lambda tmp: dict(tokenizer=str(tmp)), "encoders.text.tokenizer=.*: not a tokenizer folder"),
    # transformers kept the misspelled key as an inert extra: the preset's 12 layers were built
    (lambda tmp: dict(overrides={**TINY_TEXT, "num_hidden_layer": 1}), "BertConfig has no setting num_hidden_layer"),
], ids=["name", "missing-tokenizer", "empty-tokenizer", "override-key"])
def test_bad_text_settings_name_the_field(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        build_text_encoder(tiny_text(**changes(tmp_path)))


def test_a_max_length_beyond_the_models_positions_is_refused(tmp_path):
    """A max_length longer than the model's position table was accepted; the first title that
    long failed inside BERT's embeddings on a tensor size clash."""
    with pytest.raises(ConfigError, match=r"encoders.text.max_length=65: .* 64 usable positions"):
        build_text_encoder(tiny_text(max_length=65))
    encoder = build_text_encoder(tiny_text(max_length=64)).eval()
    assert encoder(["a long product title " * 20]).shape == (1, TINY_TEXT["hidden_size"])
    # RoBERTa numbers positions after its padding id (1): 64 of them leave 62
    from transformers import RobertaConfig
    RobertaConfig(**TINY_TEXT).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"encoders.text.max_length=64: .* 62 usable positions"):
        build_text_encoder(tiny_text(name=str(tmp_path), overrides={}, max_length=64))
    roberta = build_text_encoder(tiny_text(name=str(tmp_path), overrides={}, max_length=62)).eval()
    assert roberta(["a long product title " * 20]).shape == (1, TINY_TEXT["hidden_size"])


@pytest.mark.parametrize("changes, message", [
    (dict(std=[0.0, 0.0, 0.0]), "encoders.vision.std=.*must be positive"),  # every pixel inf: the run diverged
    (dict(std=[0.2, -0.1, 0.2]), "encoders.vision.std=.*must be positive"),
    (dict(std=[0.2, float("nan"), 0.2]), "encoders.vision.std=.*finite"),
    (dict(mean=[1.0, 2.0]), r"encoders.vision.mean=\[1.0, 2.0\]: need 3 values"),
])
def test_bad_normalisation_is_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        check_normalisation(tiny_vision(**changes))
    check_normalisation(tiny_vision(mean=[0.5] * 3, std=[0.25] * 3))


def test_bf16_autocast_forward_is_finite():
    pair = EncoderPair(tiny_encoders(shared_dim=8))
    pixels = pair.vision.preprocess([png_bytes(0, 1), png_bytes(2, 0)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images, titles = pair.embed_images(pixels), pair.embed_titles(["red stripe", "blue dot"])
    assert images.dtype == torch.float32  # heads normalise in fp32
    assert torch.isfinite(images).all() and torch.isfinite(titles).all()


def test_style_stages_append_each_stages_channel_mean_and_std():
    """The pooled features come first, unchanged; then, per stage, the mean and standard
    deviation over positions of each channel of that stage's feature map."""
    plain = build_vision_encoder(tiny_vision()).eval()
    styled = build_vision_encoder(tiny_vision(style_stages=[0, 2])).eval()
    styled.load_state_dict(plain.state_dict())
    pixels = plain.preprocess([png_bytes(0, 0), png_bytes(3, 1)])
    features = styled(pixels)
    widths = [styled.backbone.feature_info[s]["num_chs"] for s in (0, 2)]
    assert styled.feature_dim == plain.feature_dim + 2 * sum(widths) == features.shape[1]
    assert torch.equal(features[:, :plain.feature_dim], plain(pixels))
    maps = styled.backbone.forward_intermediates(pixels, indices=[0, 2], intermediates_only=True)
    expected = torch.cat([torch.cat([m.mean(dim=(2, 3)), m.std(dim=(2, 3))], dim=1) for m in maps], dim=1)
    assert torch.allclose(features[:, plain.feature_dim:], expected)


def test_a_style_stage_with_a_one_position_map_is_refused():
    """ConvNeXt's stage 3 (stride 32) is 1x1 at 32 px: its std over one position was NaN, and
    the run stopped as a divergence blamed on the learning rate. At 64 px it is 2x2."""
    with pytest.raises(ConfigError, match=r"style_stages=\[2, 3\]: stage 3 \(stride 32\) has a 1x1 map at "
                                          r"encoders.vision.image_size=32"):
        build_vision_encoder(tiny_vision(style_stages=[2, 3]))
    encoder = build_vision_encoder(tiny_vision(style_stages=[2, 3], image_size=64)).eval()
    assert torch.isfinite(encoder(encoder.preprocess([png_bytes(0, 0)]))).all()


@pytest.mark.parametrize("stages", [[2, 0], [1, 1], [4], [9], [-1]])
def test_bad_style_stages_are_refused(stages):
    with pytest.raises(ConfigError, match="encoders.vision.style_stages"):
        build_vision_encoder(tiny_vision(style_stages=stages))
