"""Amazon (UniSRec/RecBole atomic format) importer, on fixtures written here."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from mim_rec.data.errors import DataError
from mim_rec.data.importers.amazon import GAP_KIND, AmazonOptions, category_phrase, import_amazon
from mim_rec.data.importers.missing import MISSING_KINDS
from mim_rec.data.io import read_events, read_items, read_pairs, validate_world
from mim_rec.data.manifest import read_manifest
from train.cli import main

DIM = 8
SEQUENCES = {0: [0, 1, 2, 3, 4], 1: [5, 2, 6], 2: [1, 7, 0, 5]}
CATEGORIES = ["Industrial & Scientific Tapes, Adhesives & Sealants Glue",
              "Industrial & Scientific Lab & Scientific Products Pipettes"]
N_ITEMS, N_USERS = 8, 3


def write_amazon(root, inter_header="user_id:token\titem_id_list:token_seq\titem_id:token",
                 texts=None, features=None):
    """A tiny data set in the atomic format: rows per user as the real split writes them."""
    root.mkdir(exist_ok=True)
    (root / "Tiny.item2index").write_text("".join(f"ASIN{i}\t{i}\n" for i in range(N_ITEMS)))
    (root / "Tiny.user2index").write_text("".join(f"USER{u}\t{u}\n" for u in range(N_USERS)))
    texts = texts if texts is not None else {
        i: f"Item {i}. Title, v2. {CATEGORIES[i % 2]}. {'Acme' if i % 3 else ''}."
        for i in range(N_ITEMS)}
    (root / "Tiny.text").write_text("item_id:token\ttext:token_seq\n" + "".join(
        f"ASIN{i}\t{t}\n" for i, t in texts.items()))
    rows = {"train": [], "valid": [], "test": []}
    for user, seq in SEQUENCES.items():
        for k in range(len(seq) - 3, 0, -1):  # longest first, as the real train file lists them
            rows["train"].append((user, seq[:k], seq[k]))
        rows["valid"].append((user, seq[:-2], seq[-2]))
        rows["test"].append((user, seq[:-1], seq[-1]))
    for split, lines in rows.items():
        (root / f"Tiny.{split}.inter").write_text(inter_header + "\n" + "".join(
            f"{u}\t{' '.join(map(str, h))}\t{t}\n" for u, h, t in lines))
    rng = np.random.default_rng(0)
    feats = features if features is not None else rng.normal(size=(N_ITEMS, DIM)).astype("<f4")
    feats.tofile(root / "Tiny.feat3CLS")
    rng.normal(size=(N_ITEMS, DIM)).astype("<f4").tofile(root / "Tiny.feat1CLS")
    return root


EVERY_KIND = tuple(MISSING_KINDS["amazon"])


def options(**kw):
    return AmazonOptions(feature_dim=DIM, **kw)


def test_import_builds_a_valid_world(tmp_path):
    src = write_amazon(tmp_path / "src")
    out = tmp_path / "world"
    report = import_amazon(src, out, options(negatives=2, negative_sampling="uniform", seed=3))
    assert report.counts["interactions"] == sum(len(s) for s in SEQUENCES.values())
    assert [r.rows for r in validate_world(out)][:1] == [N_ITEMS]
    manifest = read_manifest(out)
    assert (manifest.kind, manifest.stage, manifest.extra["counts"]["users"]) == ("world", "import", 3)
    from mim_rec.data.manifest import world_age_caveat
    assert "ordered by user, not by time" in world_age_caveat(out)  # what reports print under S1..S10

    items = read_items(out / "items.parquet")
    assert items.column("raw_item_id").to_pylist()[3] == "ASIN3"
    feats = np.fromfile(src / "Tiny.feat3CLS", "<f4").reshape(N_ITEMS, DIM)
    assert np.allclose(np.array(items.column("image_feature").to_pylist()), feats)
    cats = items.column("category_id").to_pylist()
    assert cats[0] == cats[2] != cats[1]  # derived from the category phrase below the root
    created = items.column("created_at").cast("int64").to_numpy()
    assert created[0] == 0 and created[1] == 1  # user 0's first items appear first
    assert report.counts["items first seen after train"] == 4  # items 3, 5 (valid), 4, 6 (test)
    assert created[6] == created.max() and created[5] > created[7]

    test = read_events(out / "events_test.parquet", N_ITEMS).to_pylist()
    assert len(test) == N_USERS * 3
    positives = [r for r in test if r["label"] == 1]
    assert [(r["user_id"], r["target_item_id"], r["hist_item_ids"]) for r in positives] == [
        (u, s[-1], s[:-1]) for u, s in SEQUENCES.items()]
    for r in test:
        assert len(r["hist_ts"]) == len(r["hist_item_ids"])
        assert r["hist_ts"] == sorted(r["hist_ts"]) and r["hist_ts"][-1] < r["ts"]
        if r["label"] == 0:
            assert r["target_item_id"] not in SEQUENCES[r["user_id"]]
    train = read_events(out / "events_train.parquet", N_ITEMS)
    assert train.num_rows == 3 * sum(len(s) - 2 for s in SEQUENCES.values())  # train + valid

    pairs = read_pairs(out / "pairs_test.parquet", N_ITEMS).to_pylist()
    for pair, (user, seq) in zip(pairs, SEQUENCES.items()):
        assert pair["item_id"] == seq[-1] and pair["signal"] == "purchase"
        assert np.allclose(pair["query_feature"], feats[seq[-2]])


def test_negative_sampling_is_seeded(tmp_path):
    src = write_amazon(tmp_path / "src")

    def targets(seed, method):
        out = tmp_path / f"w{seed}{method}"
        import_amazon(src, out, options(negatives=3, negative_sampling=method, seed=seed))
        return pq.read_table(out / "events_train.parquet").column("target_item_id").to_pylist()

    assert targets(1, "popularity") == targets(1, "popularity")
    assert targets(1, "uniform") != targets(2, "uniform")


def test_cli_import(tmp_path, capsys):
    src = write_amazon(tmp_path / "src", features=np.ones((N_ITEMS, 512), "<f4"))
    assert main(["data", "import", "--format", "amazon", str(src), "--out", str(tmp_path / "w"),
                 "--negatives", "1"]) == 0
    assert "events_train" in capsys.readouterr().out


def test_a_negative_seed_is_refused_by_the_parser(tmp_path, capsys):
    """It reached NumPy after every source was read and ended in a traceback."""
    src = write_amazon(tmp_path / "src")
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "import", "--format", "amazon", str(src), "--out", str(tmp_path / "w"),
              "--seed", "-1"])
    assert exit_info.value.code == 2
    assert "--seed: must be >= 0, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("negatives", [0, N_ITEMS, 100_000])
def test_negatives_per_positive_must_fit_the_catalogue(tmp_path, capsys, negatives):
    """0 wrote an all-positive CTR world; 100,000 ran the importer out of memory."""
    src = write_amazon(tmp_path / "src")
    assert main(["data", "import", "--format", "amazon", str(src), "--out", str(tmp_path / "w"),
                 "--negatives", str(negatives)]) == 2
    assert f"--negatives {negatives}: the reviews hold no non-clicks, so each positive needs 1 to {N_ITEMS - 1}" \
        in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_negatives_past_what_the_longest_sequence_leaves_are_refused_up_front(tmp_path, capsys):
    """User 0 has 5 of the 8 items, so each of its positives has at most 3 non-clicks: the
    sampler redrew its rows in vain (1,000 rounds; on the real Scientific data with
    --negatives 1584, over ten minutes before it was stopped), then blamed the data."""
    src = write_amazon(tmp_path / "src", features=np.ones((N_ITEMS, 512), "<f4"))
    assert main(["data", "import", "--format", "amazon", str(src), "--out", str(tmp_path / "w"),
                 "--negatives", "4"]) == 2
    err = capsys.readouterr().err
    assert f"--negatives 4: user 'USER0' (index 0 of {src / 'Tiny.user2index'}) has 5 of the 8 items in its " \
           f"sequence" in err and "give --negatives 3 or fewer" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()
    import_amazon(src, tmp_path / "w", AmazonOptions(negatives=3))  # the largest that fits


@pytest.mark.parametrize("case", ["missing column", "item out of range", "inconsistent history",
                                  "truncated features", "wrong vector size", "missing text",
                                  "truncated test", "test cut mid-row", "not utf-8"])
def test_bad_sources_are_refused(tmp_path, case):
    src = tmp_path / "src"
    feats = np.zeros((N_ITEMS, DIM), "<f4")
    field = row = None
    if case == "missing column":
        write_amazon(src, inter_header="user_id:token\titem_ids:token_seq\titem_id:token")
        file, field, match = "Tiny.train.inter", "item_id_list:token_seq", "missing column"
    elif case in ("item out of range", "inconsistent history"):
        write_amazon(src)
        lines = (src / "Tiny.valid.inter").read_text().splitlines()
        user, history, target = lines[1].split("\t")
        lines[1] = "\t".join([user, history, "99"] if case == "item out of range"
                             else [user, "4 " + history.split(" ", 1)[1], target])
        (src / "Tiny.valid.inter").write_text("\n".join(lines) + "\n")
        file, row = "Tiny.valid.inter", 0
        field, match = (("item_id:token", "outside item2index") if case == "item out of range"
                        else ("item_id_list:token_seq", "earlier row"))
    elif case == "truncated features":
        write_amazon(src, features=feats[:-1])
        file, row, match = "Tiny.feat3CLS", N_ITEMS - 1, "holds 7 rows"
    elif case == "wrong vector size":
        write_amazon(src, features=np.zeros((N_ITEMS, DIM - 3), "<f4"))
        file, match = "Tiny.feat3CLS", "holds 5 rows of 8 float32"
    elif case == "missing text":
        write_amazon(src, texts={i: f"Item {i}. C. B." for i in range(N_ITEMS - 1)})
        file, match = "Tiny.text", "items without text: 1"
    elif case == "truncated test":  # cut at a line boundary: every row left is well formed
        write_amazon(src)
        lines = (src / "Tiny.test.inter").read_text().splitlines(keepends=True)
        (src / "Tiny.test.inter").write_text("".join(lines[:-1]))
        file, match = "Tiny.test.inter", "users without a test row: 1"
    elif case == "test cut mid-row":  # "142" cut to "14" was still an item: a wrong positive, no error
        write_amazon(src)
        (src / "Tiny.test.inter").write_bytes((src / "Tiny.test.inter").read_bytes()[:-1])
        file, row, match = "Tiny.test.inter", N_USERS - 1, "no line end: the file looks cut short"
    else:  # used to be a UnicodeDecodeError traceback
        write_amazon(src)
        lines = (src / "Tiny.text").read_bytes().splitlines(keepends=True)
        lines[3] = lines[3].replace(b"Title", b"Ti\xfftle")
        (src / "Tiny.text").write_bytes(b"".join(lines))
        file, row, match = "Tiny.text", 2, "not UTF-8"
    with pytest.raises(DataError, match=match) as info:
        import_amazon(src, tmp_path / "out", options())
    assert info.value.file.endswith(file)
    if field is not None:
        assert info.value.field == field
    if row is not None:
        assert info.value.row == row
    if case == "missing text":  # accepted with a counted default
        report = import_amazon(src, tmp_path / "out", options(allow_missing=("text",)))
        assert report.missing == {"items without text": 1}
        assert read_items(tmp_path / "out" / "items.parquet").column("title")[-1].as_py() == "ASIN7"
    if case == "truncated test":  # accepted, counted, when the user says so
        report = import_amazon(src, tmp_path / "out", options(allow_missing=("inter-rows",)))
        assert report.missing == {"users without a test row": 1}
        assert report.counts["inter rows test"] == N_USERS - 1


@pytest.mark.parametrize("name", ["Tiny.item2index", "Tiny.user2index", "Tiny.train.inter"])
def test_a_byte_order_mark_is_skipped(tmp_path, name):
    """A BOM (as some editors save UTF-8) started the first token: in item2index the first ASIN
    then matched no .text line and the text file was blamed; in user2index it was written into
    raw_user_id without a word. Skipped, the world is the one the file without it gives."""
    src = write_amazon(tmp_path / "src")
    import_amazon(src, tmp_path / "plain", options())
    (src / name).write_bytes(b"\xef\xbb\xbf" + (src / name).read_bytes())
    import_amazon(src, tmp_path / "bom", options())
    for file in sorted(p.name for p in (tmp_path / "plain").glob("*.parquet")):
        assert pq.read_table(tmp_path / "bom" / file).equals(pq.read_table(tmp_path / "plain" / file)), file


@pytest.mark.parametrize("name", ["Tiny.item2index", "Tiny.user2index", "Tiny.text", "Tiny.train.inter",
                                  "Tiny.valid.inter", "Tiny.test.inter"])
def test_crlf_line_ends_read_as_lf_ones(tmp_path, name):
    """A file saved on Windows ends its lines with CRLF: the index files read it (the '\\r' ended
    an index, which int() strips), the .text and .inter files were refused as "missing column
    (header is [..., 'item_id:token\\r'])". The world is the one the LF file gives."""
    src = write_amazon(tmp_path / "src")
    import_amazon(src, tmp_path / "lf", options())
    (src / name).write_bytes((src / name).read_bytes().replace(b"\n", b"\r\n"))
    import_amazon(src, tmp_path / "crlf", options())
    for file in sorted(p.name for p in (tmp_path / "lf").glob("*.parquet")):
        assert pq.read_table(tmp_path / "crlf" / file).equals(pq.read_table(tmp_path / "lf" / file)), file


def test_every_missing_count_has_a_kind_to_admit_it():
    """A count of no --allow-missing kind could never be admitted."""
    assert tuple(dict.fromkeys(GAP_KIND.values())) == EVERY_KIND


def test_category_phrase():
    path = "Industrial & Scientific Tapes, Adhesives & Sealants Urethane Adhesives"
    assert category_phrase(path) == "Industrial & Scientific"
    assert category_phrase(path, 1) == "Tapes, Adhesives & Sealants"
    assert category_phrase("Industrial & Scientific Additive Manufacturing", 1) == "Additive"


def test_segments_read_a_brand_that_starts_with_the_root_from_the_right():
    from mim_rec.data.importers.amazon import _segments

    assert _segments("Serum. Beauty Skin Care Face. Beauty Without Cruelty.", "Beauty") == \
        ("Serum", "Beauty Skin Care Face", "Beauty Without Cruelty")
    assert _segments("Tape. Industrial & Scientific Tapes. K.S. Choi Corp.", "Industrial & Scientific") == \
        ("Tape", "Industrial & Scientific Tapes", "K.S. Choi Corp")


def test_a_brand_holding_a_full_stop_keeps_its_items_category_and_brand(tmp_path):
    """Split from the right, "K.S. Choi Corp." made 'K.S' the category path and 'Choi Corp' the
    brand: four real items had made-up one-item categories."""
    texts = {i: f"Item {i}. Title, v2. {CATEGORIES[i % 2]}. {'Acme' if i % 3 else ''}." for i in range(N_ITEMS)}
    texts[2] = f"Item 2. Title. {CATEGORIES[0]}. K.S. Choi Corp."
    texts[4] = f"Item 4. {CATEGORIES[0]}. Norton Abrasives - St. Gobain."  # a category path alone too
    src = write_amazon(tmp_path / "src", texts=texts)
    report = import_amazon(src, tmp_path / "out", options())
    items = read_items(tmp_path / "out" / "items.parquet")
    cats = items.column("category_id").to_pylist()
    assert cats[2] == cats[4] == cats[0] != cats[1] and report.counts["categories"] == 2
    brand_id = items.column("brand_id").to_pylist()  # Acme, K.S. Choi Corp, Norton Abrasives - St. Gobain
    named = {brand_id[1], brand_id[2], brand_id[4]}
    assert report.counts["brands"] == 3 and len(named) == 3 and 0 not in named


def test_feat1cls_is_neither_needed_nor_fingerprinted(tmp_path):
    """The text features are not imported, yet a missing file was a FileNotFoundError traceback
    (it was listed among the fingerprinted sources)."""
    src = write_amazon(tmp_path / "src")
    (src / "Tiny.feat1CLS").unlink()
    import_amazon(src, tmp_path / "out", options())
    inputs = read_manifest(tmp_path / "out").inputs
    assert "Tiny.feat1CLS" not in inputs and "Tiny.feat3CLS" in inputs


def _edit_inter(src, split, edit):
    path = src / f"Tiny.{split}.inter"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


@pytest.mark.parametrize("case", ["repeated train row", "repeated test row", "stale valid row",
                                  "valid row skips an item"])
def test_repeated_or_stale_rows_are_refused(tmp_path, case):
    """A repeated or stale row used to pass silently: its interaction was trained on (or scored)
    twice, and a stale test row's target already sat in the training histories."""
    src = write_amazon(tmp_path / "src")
    user0 = SEQUENCES[0]
    if case == "repeated train row":  # train lines: user 0's rows first (positions 2, 1)
        _edit_inter(src, "train", lambda lines: lines[:3] + [lines[1]] + lines[3:])
        file, row, match = "Tiny.train.inter", 2, "repeats row 0"
    elif case == "repeated test row":
        _edit_inter(src, "test", lambda lines: lines + [lines[2]])
        file, row, match = "Tiny.test.inter", N_USERS, "already in the earlier rows"
    elif case == "stale valid row":  # user 0's valid row replaced by one of its train rows
        stale = f"0\t{' '.join(map(str, user0[:1]))}\t{user0[1]}"
        _edit_inter(src, "valid", lambda lines: [lines[0], stale] + lines[2:])
        file, row, match = "Tiny.valid.inter", 0, "position 1 of user 0's sequence, is already"
    else:  # user 0's valid row holds its test row: two items beyond the train rows, which
        # --allow-missing takes as a gap; the test row then repeats that interaction
        test_row = f"0\t{' '.join(map(str, user0[:-1]))}\t{user0[-1]}"
        _edit_inter(src, "valid", lambda lines: [lines[0], test_row] + lines[2:])
        file, row, match = "Tiny.test.inter", 0, "is already in the earlier rows"
        with pytest.raises(DataError, match="adds 1 item that no earlier row has") as strict:
            import_amazon(src, tmp_path / "out", options())
        assert (strict.value.file.endswith("Tiny.valid.inter"), strict.value.row) == (True, 0)
    with pytest.raises(DataError, match=match) as info:
        import_amazon(src, tmp_path / "out", options(allow_missing=("inter-rows",)))
    assert info.value.file.endswith(file)
    assert (info.value.row, info.value.field) == (row, "item_id:token")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_empty_split_is_refused_even_with_allow_missing(tmp_path, split):
    """A header-only test file was imported (exit 0) into a world every later command refused."""
    src = write_amazon(tmp_path / "src")
    _edit_inter(src, split, lambda lines: lines[:1])
    with pytest.raises(DataError, match=f"holds no rows \\(header only\\): the world's {split} split"
                                        f" would be empty") as info:
        import_amazon(src, tmp_path / "out", options(allow_missing=EVERY_KIND))
    assert info.value.file.endswith(f"Tiny.{split}.inter")
    assert not (tmp_path / "out").exists()


def test_a_missing_folder_an_unnamed_set_and_an_empty_file_say_so(tmp_path):
    with pytest.raises(DataError, match="no such folder") as info:
        import_amazon(tmp_path / "nowhere", tmp_path / "out", options())
    assert info.value.file.endswith("nowhere")
    src = write_amazon(tmp_path / "src")
    for name in ("Tiny.train.inter", "Other.train.inter"):
        (tmp_path / "two").mkdir(exist_ok=True)
        (tmp_path / "two" / name).write_text("")
    with pytest.raises(DataError, match="found \\['Other', 'Tiny'\\]; pass the data set name with --name"):
        import_amazon(tmp_path / "two", tmp_path / "out", options())
    (src / "Tiny.text").write_text("")
    with pytest.raises(DataError, match="is empty \\(expected the header") as info:
        import_amazon(src, tmp_path / "out", options())
    assert info.value.file.endswith("Tiny.text")


def test_a_missing_train_row_is_counted_not_silently_dropped(tmp_path):
    """Its interaction became history only, neither a train positive nor a pair, and the import
    said nothing (the valid and test files had this check; the train file did not)."""
    src = write_amazon(tmp_path / "src")
    _edit_inter(src, "train", lambda lines: lines[:2] + lines[3:])  # user 0's position-1 row
    with pytest.raises(DataError, match="interactions that are no row's target: 1") as info:
        import_amazon(src, tmp_path / "out", options())
    assert info.value.file.endswith("Tiny.train.inter")
    report = import_amazon(src, tmp_path / "out", options(allow_missing=("inter-rows",)))
    assert report.missing == {"interactions that are no row's target": 1}

    # the longest train row, the one right before the valid row: the valid row then adds two
    # items, and that was refused (blamed on the valid file) even with --allow-missing
    src = write_amazon(tmp_path / "src2")
    _edit_inter(src, "train", lambda lines: lines[:1] + lines[2:])  # user 0's position-2 row
    with pytest.raises(DataError, match="an earlier file lacks rows") as info:
        import_amazon(src, tmp_path / "out", options())
    report = import_amazon(src, tmp_path / "out", options(allow_missing=("inter-rows",)))
    assert report.missing == {"interactions that are no row's target": 1}


def test_a_train_row_in_a_missing_valid_slot_does_not_hide_another_users_gap(tmp_path):
    """Gaps were summed over users unclamped: a user whose train file reaches the missing valid
    row's slot counted -1 and cancelled another user's untargeted interaction, which then went
    unreported under --allow-missing."""
    src = write_amazon(tmp_path / "src")
    seq0, seq2 = SEQUENCES[0], SEQUENCES[2]
    slot = len(seq0) - 2  # user 0's valid position, now a train row's target
    moved = f"0\t{' '.join(map(str, seq0[:slot]))}\t{seq0[slot]}"
    _edit_inter(src, "valid", lambda lines: [l for l in lines if not l.startswith("0\t")])
    _edit_inter(src, "train", lambda lines: lines[:1] + [moved] + [
        l for l in lines[1:] if not (l.startswith("2\t") and len(l.split("\t")[1].split()) == 1)])
    report = import_amazon(src, tmp_path / "out", options(allow_missing=("inter-rows",)))
    assert report.missing == {"users without a valid row": 1,
                              "interactions that are no row's target": 1}


def test_a_short_valid_file_is_named_and_can_be_accepted(tmp_path):
    """The test file took the blame (its row 'adds an item no earlier row has'), even with
    --allow-missing, so the counted default it offers could never be had."""
    src = write_amazon(tmp_path / "src")
    _edit_inter(src, "valid", lambda lines: lines[:-1])  # the last user's valid row
    with pytest.raises(DataError, match="users without a valid row: 1") as info:
        import_amazon(src, tmp_path / "out", options())
    assert info.value.file.endswith("Tiny.valid.inter")
    report = import_amazon(src, tmp_path / "out", options(allow_missing=("inter-rows",)))
    assert report.missing == {"users without a valid row": 1}
    last_user, seq = max(SEQUENCES.items())
    test = read_events(tmp_path / "out" / "events_test.parquet", N_ITEMS).to_pylist()
    assert [(r["target_item_id"], r["hist_item_ids"]) for r in test if r["user_id"] == last_user and r["label"]] \
        == [(seq[-1], seq[:-1])]


def test_several_negatives_of_one_positive_are_distinct(tmp_path):
    """Drawn independently, one non-click could be drawn twice and count twice in training and AUC."""
    from mim_rec.data.importers.common import sample_negatives

    users = np.zeros(2000, np.int64)
    negatives = sample_negatives(users, 4, 7, {0: np.array([0, 1])}, "uniform", None,
                                 np.random.default_rng(0), "test")
    assert negatives.shape == (2000, 4)
    assert all(len(set(row)) == 4 for row in negatives.tolist())
    assert not np.isin(negatives, [0, 1]).any()


def test_popularity_counts_every_training_interaction(tmp_path, monkeypatch):
    """The valid rows are training events too: their targets were left out of the popularity
    that draws the negatives, so an item clicked mostly in valid rows drew few non-clicks and
    its training click rate rose with its share of valid clicks."""
    from mim_rec.data.importers import amazon

    drawn_with = []

    def recording(users, count, item_count, positives, method, popularity, *rest):
        drawn_with.append(popularity.copy())
        return real(users, count, item_count, positives, method, popularity, *rest)

    real = amazon.sample_negatives
    monkeypatch.setattr(amazon, "sample_negatives", recording)
    out = tmp_path / "world"
    import_amazon(write_amazon(tmp_path / "src"), out, options())
    train = read_events(out / "events_train.parquet", N_ITEMS)
    clicked = np.array(train.filter(train.column("label").to_numpy() == 1).column("target_item_id"))
    firsts = [seq[0] for seq in SEQUENCES.values()]  # history only, never a target
    expected = np.bincount(np.concatenate([clicked, firsts]), minlength=N_ITEMS)
    assert expected[3] == 1  # item 3 is only ever a valid row's target
    assert len(drawn_with) == 2  # events_train, events_test
    assert all(np.array_equal(p, expected) for p in drawn_with)


def test_the_python_api_refuses_an_out_that_holds_the_source(tmp_path):
    """Only the command line refused it: import_amazon(W/raw, W) replaced W's contents whole,
    the source among them."""
    (tmp_path / "w").mkdir()
    src = write_amazon(tmp_path / "w" / "raw")
    with pytest.raises(DataError, match=r"the source lies inside --out=.*/w, whose contents the output replaces"):
        import_amazon(src, tmp_path / "w", AmazonOptions())
    assert (src / "Tiny.item2index").is_file()
