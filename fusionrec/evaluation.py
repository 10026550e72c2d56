"""`fusionrec eval`: replay a data set through the real path and score the rankings.

fusionrec's rankings come only from the gRPC ranker of an embedded stack (`fusionrec up` as a
child process) fed through the real topics and agents: items are published and onboarded,
history events are published with their own timestamps and folded by the profile agent, and
the ranker is asked. Peers (most-popular, BPR, VBPR, the content-only baseline) are computed
in-process on exactly the same history, test positives and candidates (every item the user has
not rated; cold items only where the protocol says so). The splits and metrics are
`fusionrec.protocols`; the protocols themselves are ../shared/data/movielens-100k/README.md.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from rich.console import Console
from rich.progress import track

from fusionrec import fitting
from fusionrec import protocols as p
from fusionrec.launcher import spawn_stack
from fusionrec.publisher import Publisher
from fusionrec.settings import Settings, load_settings
from serving.client import RankerClient
from serving.fusion import fuse
from streams.profiles import fold
from streams.records import decode_item

console = Console(stderr=True)
T = TypeVar("T")
K = p.K
PEERS = ("most-popular", "bpr", "vbpr", "content")
# Protocol C also runs these retrained every day (VBPR is left out: ~1 min a training here).
DAILY = ("most-popular", "bpr", "content")
DAILY_SUFFIX = " (daily)"
DAY_S = 86_400.0
# Modalities a MovieLens-style data set carries; the stack and the content baseline use these.
DATA_MODALITIES = ("text", "image")
COLD = "cold"


# -- the data set -----------------------------------------------------------------------------
@dataclass
class Dataset:
    root: Path
    items: list[dict[str, str]]  # rows of items.csv
    ratings: list[p.Rating]

    @classmethod
    def load(
        cls, root: Path, limit_users: int | None = None, limit_items: int | None = None
    ) -> Dataset:
        """items.csv and ratings.tsv; the limits keep the first N ids (numeric order) for
        development runs, and the ratings between what is kept."""
        with (root / "items.csv").open(newline="", encoding="utf-8") as f:
            items = sorted(csv.DictReader(f), key=lambda r: _id_key(r["item_id"]))
        if limit_items:
            items = items[:limit_items]
        ids = {r["item_id"] for r in items}
        ratings = [r for r in p.read_ratings(root / "ratings.tsv") if r.item in ids]
        if limit_users:
            users = set(sorted({r.user for r in ratings}, key=_id_key)[:limit_users])
            ratings = [r for r in ratings if r.user in users]
        return cls(root, items, ratings)

    @property
    def item_ids(self) -> list[str]:
        return [r["item_id"] for r in self.items]


def _id_key(value: str) -> tuple[int, str]:
    return (int(value), "") if value.isdigit() else (1 << 62, value)


def item_docs(ds: Dataset, cold: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Item records as a producer would send them. `attributes.split` marks protocol B's cold
    items, so the ranker can be asked for those only (its real attribute filter). A release
    date, where given, is the item's `created_at` (metadata known before any rating)."""
    docs = []
    for r in ds.items:
        genres = [g for g in (r.get("genres") or "").split("|") if g]
        doc: dict[str, Any] = {
            "id": r["item_id"],
            "title": r.get("title") or "",
            "description": r.get("description") or "",
            "tags": genres,
            "category": genres[0] if genres else None,
            "attributes": {"split": COLD if r["item_id"] in cold else "warm"},
        }
        # A poster that is missing on disk is a missing modality, not an item to refuse.
        if r.get("poster") and (ds.root / r["poster"]).is_file():
            doc["image"] = r["poster"]
        released = _date(r.get("release_date") or "")
        if released is not None:
            doc["created_at"] = released
        docs.append({k: v for k, v in doc.items() if v is not None})
    return docs


def _date(text: str) -> float | None:
    for fmt in ("%d-%b-%Y", "%Y-%m-%d"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    return None


def event_doc(r: p.Rating, row: int) -> dict[str, Any]:
    """A rating event; without timestamps the row number stands in (order only)."""
    return {
        "event_id": f"eval-{r.user}-{r.item}-{row}",
        "user_id": r.user,
        "item_id": r.item,
        "type": "rating",
        "value": r.value,
        "timestamp": r.ts if r.ts is not None else float(row),
    }


# -- item vectors, in-process, with the stack's own encoders and content path ------------------
@dataclass
class ItemVectors:
    ids: list[str]
    vectors: dict[str, np.ndarray]  # modality -> (n, d), zero rows where absent
    present: dict[str, np.ndarray]  # modality -> (n,) bool


def encode_items(docs: list[dict[str, Any]], settings: Settings, cache: Path) -> ItemVectors:
    """The same encoders (encoders.registry) and the same content extraction (streams.catalog)
    the stack uses: the stack's Qdrant local mode is locked by its process, so the vectors are
    made again here rather than read back. Cached in `cache` by item ids and vector names."""
    from encoders.registry import build_encoders
    from streams.catalog import Catalog

    encoders = build_encoders(
        settings.encoders,
        max_image_pixels=settings.media.max_image_pixels,
        max_audio_seconds=settings.media.max_audio_seconds,
    )
    names = {m: e.vector_name for m, e in encoders.items()}
    ids = [d["id"] for d in docs]
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        if list(z["ids"]) == ids and json.loads(str(z["names"])) == names:
            return ItemVectors(
                ids,
                {m: z[f"v_{m}"] for m in names},
                {m: z[f"p_{m}"] for m in names},
            )
    catalog = Catalog(None, settings, encoders)  # type: ignore[arg-type]  # encode only
    records = [decode_item(json.dumps(d).encode()) for d in docs]
    vecs = {m: np.zeros((len(ids), e.dim), np.float32) for m, e in encoders.items()}
    present = {m: np.zeros(len(ids), bool) for m in encoders}
    step = 64
    for start in track(range(0, len(records), step), "encoding items (peers)", console=console):
        for j, out in enumerate(catalog.encode(records[start : start + step]), start):
            if isinstance(out, dict):
                for m, name in names.items():
                    if name in out:
                        vecs[m][j], present[m][j] = out[name], True
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        cache,
        ids=np.array(ids),
        names=json.dumps(names),
        **{f"v_{m}": v for m, v in vecs.items()},
        **{f"p_{m}": v for m, v in present.items()},
    )
    return ItemVectors(ids, vecs, present)


def fit_weights(
    ds: Dataset,
    history: Sequence[p.Rating],
    items: ItemVectors,
    settings: Settings,
    protocol: str,
    seed: int,
) -> fitting.Fit:
    """fusionrec.fitting on a data set: its items' vectors and their tags (the genres)."""
    tags = [d.get("tags", []) for d in item_docs(ds)]
    return fitting.fit(
        history, items.ids, items.vectors, items.present, settings, protocol, seed, item_tags=tags
    )


# -- peers ------------------------------------------------------------------------------------
class Peer:
    """Scores every item of the catalog for a user, from history only."""

    name = "peer"

    def __init__(self, item_ids: list[str]) -> None:
        self.ids = item_ids
        self.index = {i: j for j, i in enumerate(item_ids)}
        self.popular = np.zeros(len(item_ids))

    def fit(self, history: Sequence[p.Rating]) -> Peer:
        for r in history:
            if r.positive and r.item in self.index:
                self.popular[self.index[r.item]] += 1
        return self

    def scores(self, user: str) -> np.ndarray:
        return self.popular


class MostPopular(Peer):
    name = "most-popular"


class ContentBaseline(Peer):
    """What a Qdrant user would build: per modality, the user's profile is the mean of the
    vectors of the items they rated positively (streams.profiles.fold, weight 1, no decay);
    score = serving.fusion.fuse (cosine, the settings' fixed weights). No profile: popular."""

    name = "content"

    def __init__(self, items: ItemVectors, weights: dict[str, float]) -> None:
        super().__init__(items.ids)
        self.items = items
        self.weights = {m: w for m, w in weights.items() if m in items.vectors}
        self.profiles: dict[str, dict[str, np.ndarray]] = {}

    def fit(self, history: Sequence[p.Rating]) -> Peer:
        super().fit(history)
        for r in history:
            j = self.index.get(r.item)
            if not r.positive or j is None:
                continue
            item = {m: v[j] for m, v in self.items.vectors.items() if self.items.present[m][j]}
            # The direction of a sum is that of the mean; fuse normalises the profile.
            self.profiles[r.user], _ = fold(
                self.profiles.get(r.user, {}), 0.0, item, 1.0, 0.0, math.inf
            )
        return self

    def scores(self, user: str) -> np.ndarray:
        profile = self.profiles.get(user)
        if not profile:
            return self.popular
        s, _ = fuse(profile, self.items.vectors, self.items.present, self.weights)
        return s


class BPR(Peer):
    """Cornac's BPR on positives. Items it never saw in training cannot be scored: they rank
    after every known item. Users it never saw get the item biases alone."""

    name = "bpr"

    def __init__(self, item_ids: list[str], seed: int) -> None:
        super().__init__(item_ids)
        self.seed = seed

    def _train(self, history: Sequence[p.Rating]) -> Any:
        import cornac

        uir = [(r.user, r.item, 1.0) for r in history if r.positive and r.item in self.index]
        return cornac.data.Dataset.from_uir(uir, seed=self.seed)

    def _columns(self, data: Any) -> np.ndarray:
        return np.array([self.index[i] for i in data.item_ids])

    def fit(self, history: Sequence[p.Rating]) -> Peer:
        import cornac

        super().fit(history)
        data = self._train(history)
        model = cornac.models.BPR(
            k=50, max_iter=200, learning_rate=0.01, lambda_reg=0.01, seed=self.seed, verbose=False
        )
        model.fit(data)
        self.uid = data.uid_map
        self.cols = self._columns(data)
        self.U, self.V, self.b = model.u_factors, model.i_factors, model.i_biases
        return self

    def scores(self, user: str) -> np.ndarray:
        out = np.full(len(self.ids), -np.inf)
        u = self.uid.get(user)
        out[self.cols] = self.b + (self.V @ self.U[u] if u is not None else 0.0)
        return out


class VBPR(BPR):
    """Cornac's VBPR with the posters' image vectors (the stack's image encoder) as visual
    features. Cold items are scored through the visual term alone, as in He & McAuley (2016):
    theta_u . (E f_i) + beta' . f_i, with the E, beta' and theta_u learned on warm items; the
    item bias and latent factors of a cold item are taken as 0. Unknown users: beta' . f_i."""

    name = "vbpr"

    def __init__(self, items: ItemVectors, seed: int, epochs: int = 30) -> None:
        super().__init__(items.ids, seed)
        self.features = items.vectors["image"].astype(np.float32)
        self.epochs = epochs

    def fit(self, history: Sequence[p.Rating]) -> Peer:
        import cornac
        from cornac.data import ImageModality

        Peer.fit(self, history)
        data = self._train(history)
        self.cols = self._columns(data)
        data.add_modalities(item_image=ImageModality(features=self.features[self.cols]))
        model = cornac.models.VBPR(
            k=10,
            k2=20,
            n_epochs=self.epochs,
            batch_size=100,
            learning_rate=0.005,
            lambda_w=1.0,
            lambda_b=0.01,
            lambda_e=0.0,
            seed=self.seed,
            verbose=False,
        )
        model.fit(data)
        self.uid = data.uid_map
        self.b, self.Gu, self.Gi = model.beta_item, model.gamma_user, model.gamma_item
        self.Tu = model.theta_user
        self.theta_item = self.features @ model.emb_matrix  # every item, cold ones included
        self.visual_bias = (self.features @ model.beta_prime).ravel()
        return self

    def scores(self, user: str) -> np.ndarray:
        out = self.visual_bias.copy()
        out[self.cols] += self.b
        u = self.uid.get(user)
        if u is not None:
            out += self.theta_item @ self.Tu[u]
            out[self.cols] += self.Gi @ self.Gu[u]
        return out


def build_peers(
    names: Iterable[str], items: ItemVectors, settings: Settings, seed: int
) -> list[Peer]:
    makers: dict[str, Callable[[], Peer]] = {
        "most-popular": lambda: MostPopular(items.ids),
        "bpr": lambda: BPR(items.ids, seed),
        "vbpr": lambda: VBPR(items, seed),
        "content": lambda: ContentBaseline(items, settings.ranker.modality_weights),
    }
    unknown = sorted(set(names) - set(makers))
    if unknown:
        raise ValueError(f"unknown peers {unknown}; known: {list(makers)}")
    return [makers[n]() for n in names]


def top_ids(
    scores: np.ndarray, ids: Sequence[str], allowed: np.ndarray, tiebreak: np.ndarray, k: int = K
) -> list[str]:
    """The k best allowed items. Ties (e.g. cold items a model cannot score) go by `tiebreak`, a
    seeded random order: catalog ids are not neutral (MovieLens' low ids are the popular films).
    Items a model cannot score (-inf) still rank above the ones not allowed."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), neginf=-1e300)
    s = np.where(allowed, s, -np.inf)
    order = np.lexsort((tiebreak, -s))
    return [ids[j] for j in order[:k] if allowed[j]]


def allowed_items(split: p.Split, ids: Sequence[str], only: set[str]) -> dict[str, np.ndarray]:
    """Per test user, which of `ids` a ranking from history may return: those in `only` that the
    user did not rate in the split's history."""
    rated: dict[str, set[str]] = defaultdict(set)
    for r in split.history:
        rated[r.user].add(r.item)
    return {u: np.array([i in only and i not in rated[u] for i in ids]) for u in split.positives}


# -- the embedded stack -----------------------------------------------------------------------
class EmbeddedStack:
    """`fusionrec up` as a child process on free ports, with a publisher and a ranker client."""

    def __init__(
        self,
        media: Path,
        workdir: Path,
        config: Path | None,
        enabled: list[str],
        fitted: Mapping[str, str] | None = None,
    ):
        self.media, self.workdir, self.config, self.enabled = media, workdir, config, enabled
        self.fitted = dict(fitted or {})
        self.syncs = 0

    def __enter__(self) -> EmbeddedStack:
        env = {
            "FUSIONREC_MEDIA__ROOT": str(self.media.resolve()),
            "FUSIONREC_ENCODERS__ENABLED": json.dumps(self.enabled),
            **self.fitted,  # as FUSIONREC_* variables: above the config file, below flags
        }
        if self.config is not None:
            env["FUSIONREC_CONFIG"] = str(self.config.resolve())
        self.child = spawn_stack(self.workdir, env)
        self.process = self.child.process
        self.client = RankerClient(self.child.target, timeout=30)
        self.publisher: Publisher | None = None
        try:
            self.wait("the stack to serve", self.client.serving, timeout=600)
            settings = load_settings(self.config, kafka={"bootstrap": self.child.bootstrap})
            self.publisher = Publisher(settings)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.publisher is not None:
            self.publisher.close()
        self.client.close()
        self.child.stop(30)

    def wait(
        self, what: str, check: Callable[[], bool], timeout: float, every: float = 0.05
    ) -> None:
        start = time.monotonic()
        while not check():
            if self.process.poll() is not None:
                tail = self.child.log_tail(3000)
                raise RuntimeError(f"the stack exited while waiting for {what}:\n{tail}")
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(every)

    def call(self, ask: Callable[[], T], tries: int = 600) -> T:
        """One ranker call, retried while the ranker asks callers to back off: it refuses with
        RESOURCE_EXHAUSTED once its calls have taken their share of the loop it shares with
        the stream worker (busiest while the catalog is being encoded)."""
        for attempt in range(tries):
            try:
                return ask()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == tries - 1:
                    raise
                time.sleep(min(0.05 * 2**attempt, 1.0))
        raise AssertionError("unreachable")

    def known(self, item_id: str) -> bool:
        try:
            self.call(lambda: self.client.similar(item_id, 1, explain=False))
            return True
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return False

    def publish(self, kind: str, docs: Sequence[dict[str, Any]], label: str = "") -> None:
        assert self.publisher is not None
        refused = []
        rows = self.publisher.publish(kind, docs)  # type: ignore[arg-type]
        if label:
            rows = track(rows, label, total=len(docs), console=console)
        for row, why in rows:
            if why:
                refused.append(f"row {row}: {why}")
        if refused:
            raise RuntimeError(f"{len(refused)} {kind} refused: " + "; ".join(refused[:5]))

    def onboard(self, docs: Sequence[dict[str, Any]], stall_s: float = 180.0) -> list[str]:
        """Publish items and wait until the ranker knows them; returns the ids it never got
        (refused by the worker: dead-lettered), after `stall_s` without progress."""
        self.publish("items", docs, "publishing items")
        waiting = [d["id"] for d in docs]
        last, progress = time.monotonic(), len(waiting)
        with console.status("") as status:
            # Items are onboarded in order (one partition), so ask about the newest first.
            while waiting and time.monotonic() - last < stall_s:
                if self.process.poll() is not None:
                    raise RuntimeError("the stack exited while onboarding")
                while waiting and self.known(waiting[-1]):
                    waiting.pop()
                if len(waiting) < progress:
                    last, progress = time.monotonic(), len(waiting)
                status.update(f"onboarding: {len(docs) - len(waiting)}/{len(docs)} items")
                time.sleep(0.5)
        return [i for i in waiting if not self.known(i)]

    def sync(self, item_id: str, timeout: float = 600.0) -> None:
        """Wait until every event published so far is folded: a marker event for a fresh user
        (a dislike: it earns the item no popularity) goes behind them on the one partition, and
        is folded when that user stops being a cold start."""
        self.syncs += 1
        marker = f"__eval-sync-{self.syncs}"
        doc = {"event_id": marker, "user_id": marker, "item_id": item_id, "type": "dislike"}
        self.publish("events", [{**doc, "timestamp": 0.0}])
        self.wait(
            "events to be folded",
            lambda: (
                not self.call(lambda: self.client.recommend(marker, 1, explain=False)).cold_start
            ),
            timeout,
            # The first wait (history) is long: polls would take the loop from the worker.
            every=0.5 if self.syncs == 1 else 0.05,
        )

    def rank(self, user: str, attributes: dict[str, str] | None = None) -> list[str]:
        reply = self.call(
            lambda: self.client.recommend(user, K, attributes=attributes, explain=False)
        )
        return [i.item_id for i in reply.items]


# -- one evaluation ---------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one protocol produced for one model: its figures and per-test-positive ranks."""

    figures: dict[str, dict[str, float]] = field(default_factory=dict)
    pairs: list[dict[str, Any]] = field(default_factory=list)  # for the plots
    rankings: dict[str, list[str]] = field(default_factory=dict)


def _static_figures(
    rankings: dict[str, list[str]],
    split: p.Split,
    catalog: set[str],
    cold: set[str],
    returning: set[str],
) -> dict[str, dict[str, float]]:
    warm = catalog - cold
    pos_new = {u: s for u, s in split.positives.items() if u not in returning}
    pos_ret = {u: s for u, s in split.positives.items() if u in returning}
    figures = {
        "all": p.score_users(rankings, split.positives),
        "warm_items": p.score_users(rankings, split.positives, keep=warm),
        "cold_items": p.score_users(rankings, split.positives, keep=cold),
        "returning_users": p.score_users(rankings, pos_ret),
        "new_users": p.score_users(rankings, pos_new),
    }
    lists = list(rankings.values())
    figures["coverage"] = {
        "all": p.coverage(lists, catalog),
        "warm_items": p.coverage(lists, warm),
        "cold_items": p.coverage(lists, cold),
        "items": len(catalog),
    }
    return figures


def _pairs(
    rankings: dict[str, list[str]], split: p.Split, at: dict[str, float | None]
) -> list[dict[str, Any]]:
    pop, first = p.popularity_counts(split.history), p.first_seen(split.history)
    return [
        {
            "rank": p.rank_of(rankings.get(u, []), i),
            "popularity": p.bucket(pop.get(i, 0), p.POPULARITY_EDGES),
            "age": p.age_bucket(i, at.get(u), first),
        }
        for u, items in split.positives.items()
        for i in sorted(items)
    ]


def _test_time(split: p.Split) -> dict[str, float | None]:
    """Each test user's first test positive time (the item age is measured then)."""
    out: dict[str, float | None] = {}
    for r in split.test:
        if r.positive and r.user not in out:
            out[r.user] = r.ts
    return out


class Evaluation:
    def __init__(
        self,
        ds: Dataset,
        out: Path,
        *,
        peers: Sequence[str] = (),
        config: Path | None = None,
        max_test_events: int | None = None,
        seed: int = 0,
        fit_weights: bool = True,
    ) -> None:
        self.ds, self.out, self.config, self.seed = ds, out, config, seed
        self.fit_weights = fit_weights
        self.fits: dict[str, fitting.Fit] = {}
        self.peer_names = list(peers)
        self.max_test_events = max_test_events
        self.settings = load_settings(config)
        enabled = [m for m in self.settings.encoders.enabled if m in DATA_MODALITIES]
        self.enabled = enabled or list(DATA_MODALITIES)
        self.settings = self.settings.model_copy(
            update={
                "encoders": self.settings.encoders.model_copy(update={"enabled": self.enabled}),
                "media": self.settings.media.model_copy(update={"root": ds.root.resolve()}),
            }
        )
        self.catalog = set(ds.item_ids)
        self.tiebreak = np.random.default_rng(seed).permutation(len(ds.item_ids))
        self.results: dict[str, dict[str, Outcome]] = {}
        self.notes: list[str] = []
        self.counts: dict[str, Any] = {}
        self._vectors: ItemVectors | None = None

    # the item vectors are needed only by the content and VBPR peers
    def vectors(self) -> ItemVectors:
        if self._vectors is None:
            self._vectors = encode_items(
                item_docs(self.ds), self.settings, self.out / "cache" / "item-vectors.npz"
            )
        return self._vectors

    def _peers(
        self, history: Sequence[p.Rating], names: Sequence[str] | None = None, suffix: str = ""
    ) -> list[Peer]:
        names = self.peer_names if names is None else names
        if not names:
            return []
        needs = {"content", "vbpr"} & set(names)
        items = self.vectors() if needs else ItemVectors(self.ds.item_ids, {}, {})
        peers = build_peers(names, items, self.settings, self.seed)
        for peer in peers:
            peer.name += suffix
            with console.status(f"training {peer.name} on {len(history)} ratings"):
                peer.fit(history)
        return peers

    def _stack(self, name: str, split: p.Split) -> EmbeddedStack:
        return EmbeddedStack(
            self.ds.root, self.out / "work" / name, self.config, self.enabled, self._fit(split)
        )

    def _fit(self, split: p.Split) -> dict[str, str]:
        """The ranker's weights fitted on this split's history (fusionrec.fitting), as the
        stack's settings; none when fitting is off or the history is too small to hold out."""
        if not self.fit_weights:
            return {}
        v = self.vectors()
        with console.status(f"protocol {split.name}: fitting weights on held-out history"):
            try:
                result = fit_weights(
                    self.ds, split.history, v, self.settings, split.name, self.seed
                )
            except ValueError as exc:
                self.notes.append(f"protocol {split.name}: weights not fitted ({exc})")
                return {}
        self.fits[split.name] = result
        return result.env()

    def _feed(self, stack: EmbeddedStack, split: p.Split, docs: list[dict[str, Any]]) -> None:
        missing = stack.onboard(docs)
        if missing:
            self.notes.append(
                f"protocol {split.name}: {len(missing)} items were refused by the worker "
                f"(dead-lettered) and cannot be recommended by fusionrec: {missing[:10]}"
            )
        self.sync_item = next(d["id"] for d in docs if d["id"] not in set(missing))
        events = [event_doc(r, j) for j, r in enumerate(split.history)]
        stack.publish("events", events, f"publishing {len(events)} history events")
        with console.status("folding history into profiles"):
            stack.sync(self.sync_item)

    def run(self, protocols: Sequence[str]) -> dict[str, Any]:
        timed = p.has_timestamps(self.ds.ratings)
        wanted = [x.upper() for x in protocols]
        if not timed and set(wanted) - {"B"}:
            self.notes.append("no timestamps in ratings.tsv: only protocol B applies")
            wanted = [x for x in wanted if x == "B"]
        self.out.mkdir(parents=True, exist_ok=True)
        if "A" in wanted or "C" in wanted:
            self._run_a_c("A" in wanted, "C" in wanted)
            self.report()  # written as each stack finishes: a long run keeps what it has
        if "B" in wanted:
            self._run_b()
        return self.report()

    def _run_a_c(self, do_a: bool, do_c: bool) -> None:
        split = p.protocol_a(self.ds.ratings)
        returning = p.history_users(split)
        rated_ever = {r.item for r in split.history}
        cold = self.catalog - rated_ever
        self.counts["A"] = {
            "history_events": len(split.history),
            "test_users": len(split.positives),
            "test_users_without_history": len(
                set(split.positives) - p.history_users(split, positive_only=False)
            ),
            "returning_test_users": len(set(split.positives) & returning),
            "test_positives": sum(len(s) for s in split.positives.values()),
            "cold_items_in_catalog": len(cold),
            "cutoff": split.test[0].ts,
        }
        peers = self._peers(split.history)
        with self._stack("A", split) as stack:
            self._feed(stack, split, item_docs(self.ds))
            if do_a:
                self._static("A", split, peers, stack, None, cold, returning)
            if do_c:
                self._prequential(split, peers, [n for n in DAILY if n in self.peer_names], stack)

    def _run_b(self) -> None:
        split = p.protocol_b(self.ds.ratings, self.seed)
        cold = set(split.cold_items)
        returning = p.history_users(split)
        self.counts["B"] = {
            "cold_items": len(cold),
            "items_with_a_positive": len({r.item for r in self.ds.ratings if r.positive}),
            "history_events": len(split.history),
            "test_users": len(split.positives),
            "test_positives": sum(len(s) for s in split.positives.values()),
        }
        peers = self._peers(split.history)
        with self._stack("B", split) as stack:
            self._feed(stack, split, item_docs(self.ds, split.cold_items))
            self._static("B-cold", split, peers, stack, {"split": COLD}, cold, returning)
            self._static("B-all", split, peers, stack, None, cold, returning)

    def _static(
        self,
        name: str,
        split: p.Split,
        peers: list[Peer],
        stack: EmbeddedStack,
        attributes: dict[str, str] | None,
        cold: set[str],
        returning: set[str],
    ) -> None:
        """Protocols A and B: one ranking per test user, from history alone."""
        ids = self.ds.item_ids
        allowed = allowed_items(split, ids, cold if attributes else self.catalog)
        rankings: dict[str, dict[str, list[str]]] = {"fusionrec": {}, **{q.name: {} for q in peers}}
        users = sorted(split.positives, key=_id_key)
        for u in track(users, f"protocol {name}: ranking {len(users)} users", console=console):
            rankings["fusionrec"][u] = stack.rank(u, attributes)
            for peer in peers:
                rankings[peer.name][u] = top_ids(peer.scores(u), ids, allowed[u], self.tiebreak)
        at = _test_time(split)
        self.results[name] = {
            model: Outcome(
                _static_figures(r, split, self.catalog, cold, returning), _pairs(r, split, at), r
            )
            for model, r in rankings.items()
        }

    def _prequential(
        self, split: p.Split, peers: list[Peer], daily_names: list[str], stack: EmbeddedStack
    ) -> None:
        """Protocol C: before each (sampled) test positive ask every model for the user's top
        20, excluding what the user has rated so far; then publish the event and go on.

        Static peers were trained on history once; the daily ones (`daily_names`) are trained
        again at the first question of each day (UTC), on every rating before it."""
        ids = self.ds.item_ids
        index = {i: j for j, i in enumerate(ids)}
        test = split.test
        where = [j for j, r in enumerate(test) if r.positive]
        chosen = {where[s] for s in p.sample_indices(len(where), self.max_test_events, self.seed)}
        self.counts["C"] = {
            "test_events": len(test),
            "test_positives": len(where),
            "asked": len(chosen),
            "sampled": len(chosen) < len(where),
        }
        if len(chosen) < len(where):
            self.notes.append(
                f"protocol C: {len(chosen)} of {len(where)} test positives asked (uniform sample, "
                f"seed {self.seed}); every test event is still replayed in order"
            )
        rated: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(ids), bool))
        had_positive = set(p.history_users(split))
        seen_items = {r.item for r in split.history}
        for r in split.history:
            if r.item in index:
                rated[r.user][index[r.item]] = True
        pop, first = p.popularity_counts(split.history), p.first_seen(split.history)
        daily: list[Peer] = []
        day: int | None = None
        models = [
            "fusionrec",
            *(q.name for q in peers),
            *(f"{n}{DAILY_SUFFIX}" for n in daily_names),
        ]
        rows: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
        cache: dict[tuple[str, str], np.ndarray] = {}
        buffer: list[dict[str, Any]] = []
        unsynced: set[str] = set()
        offset = len(split.history)
        for j in track(
            range(len(test)), f"protocol C: replaying {len(test)} events", console=console
        ):
            r = test[j]
            if j in chosen:
                if buffer:
                    stack.publish("events", buffer)
                    buffer = []
                # The user's own earlier events must be folded before asking; other users'
                # may still be in flight (at most a batch window), as in production.
                if r.user in unsynced:
                    stack.sync(self.sync_item)
                    unsynced.clear()
                ranked = {"fusionrec": stack.rank(r.user)}
                allowed = ~rated[r.user]
                if daily_names and int((r.ts or 0.0) // DAY_S) != day:
                    day = int((r.ts or 0.0) // DAY_S)
                    daily = self._peers([*split.history, *test[:j]], daily_names, DAILY_SUFFIX)
                    cache = {
                        key: v for key, v in cache.items() if not key[0].endswith(DAILY_SUFFIX)
                    }
                for peer in (*peers, *daily):
                    key = (peer.name, r.user)
                    if key not in cache:
                        cache[key] = peer.scores(r.user)
                    ranked[peer.name] = top_ids(cache[key], ids, allowed, self.tiebreak)
                tags = {
                    "users": "returning" if r.user in had_positive else "new",
                    "items": "warm" if r.item in seen_items else "cold",
                    "popularity": p.bucket(pop.get(r.item, 0), p.POPULARITY_EDGES),
                    "age": p.age_bucket(r.item, r.ts, first),
                }
                for m in models:
                    rows[m].append({"rank": p.rank_of(ranked[m], r.item), **tags})
            buffer.append(event_doc(r, offset + j))
            unsynced.add(r.user)
            if r.item in index:
                rated[r.user][index[r.item]] = True
            seen_items.add(r.item)
            if r.positive:
                had_positive.add(r.user)
        if buffer:
            stack.publish("events", buffer)
        self.results["C"] = {}
        for m in models:
            figures = {"all": p.score_events([x["rank"] for x in rows[m]])}
            for key, value in (
                ("users", "returning"),
                ("users", "new"),
                ("items", "warm"),
                ("items", "cold"),
            ):
                chosen_rows = [x["rank"] for x in rows[m] if x[key] == value]
                figures[f"{value}_{key}"] = p.score_events(chosen_rows)
            self.results["C"][m] = Outcome(figures, rows[m])
        self.counts["C"]["syncs"] = stack.syncs

    # -- the report ---------------------------------------------------------------------------
    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        keys = {
            "protocol_a": ("A", ("recall@20", "ndcg@20", "mrr@20")),
            "protocol_b_cold_only": ("B-cold", ("recall@20", "ndcg@20", "mrr@20")),
            "protocol_b_all_items": ("B-all", ("recall@20", "ndcg@20", "mrr@20")),
            "protocol_c": ("C", ("hit@20", "ndcg@20", "mrr@20")),
        }
        out: dict[str, dict[str, dict[str, float]]] = {}
        for key, (name, metrics) in keys.items():
            if name in self.results:
                out[key] = {
                    m: {x: round(o.figures["all"][x], 4) for x in metrics}
                    for m, o in self.results[name].items()
                }
        return out

    def bars(self, summary: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
        """fusionrec's NDCG@20 over the best peer's, per protocol. Issue 5's bars: >= 1.10 on A
        and B cold-only, >= 1.0 on B all items; on C >= 1.25 over the best static peer and
        > 1.0 over the best daily-retrained one."""
        wanted = {"protocol_b_all_items": 1.0, "protocol_c": 1.25}
        out = {}
        for key, models in summary.items():
            groups = {"": lambda m: not m.endswith(DAILY_SUFFIX)}
            if key == "protocol_c":
                groups["_daily"] = lambda m: m.endswith(DAILY_SUFFIX)
            for label, keep in groups.items():
                peers = {m: v["ndcg@20"] for m, v in models.items() if m != "fusionrec" and keep(m)}
                if not peers or "fusionrec" not in models:
                    continue
                best = max(peers, key=lambda m: peers[m])
                ratio = models["fusionrec"]["ndcg@20"] / peers[best] if peers[best] else math.inf
                bar = 1.0 if label else wanted.get(key, 1.1)
                out[key + label] = {
                    "best_peer": best,
                    "ratio": round(ratio, 3),
                    "bar": bar,
                    "meets": ratio > bar if label else ratio >= bar,
                }
        return out

    def report(self) -> dict[str, Any]:
        summary = self.summary()
        doc = {
            "data": str(self.ds.root),
            "items": len(self.ds.items),
            "ratings": len(self.ds.ratings),
            "users": len({r.user for r in self.ds.ratings}),
            "k": K,
            "seed": self.seed,
            "modalities": self.enabled,
            "half_life_days": self.settings.profiles.half_life_days,
            "counts": self.counts,
            "notes": self.notes,
            "summary": summary,
            "bars": self.bars(summary),
            "fitted": {
                name: {
                    "settings": f.settings,
                    "validation_users": f.validation_users,
                    "ablation_ndcg@20": dict(f.ablation()),
                }
                for name, f in self.fits.items()
            },
            "protocols": {
                name: {"models": {m: o.figures for m, o in outcomes.items()}}
                for name, outcomes in self.results.items()
            },
        }
        (self.out / "report.json").write_text(json.dumps(doc, indent=2))
        plots = write_plots(self.results, self.out)
        (self.out / "report.md").write_text(markdown(doc, plots))
        return doc


# -- plots and the page -----------------------------------------------------------------------
def _hit_rate(rows: list[dict[str, Any]], key: str) -> dict[str, tuple[float, int]]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for x in rows:
        groups[x[key]].append(x["rank"] is not None)
    return {g: (float(np.mean(v)), len(v)) for g, v in groups.items()}


def _order(labels: Iterable[str]) -> list[str]:
    def key(label: str) -> tuple[float, str]:
        head = label.split("-")[0].split("+")[0].split(" ")[0]
        return (float(head), label) if head.replace(".", "").isdigit() else (math.inf, label)

    return sorted(set(labels), key=key)


def write_plots(results: dict[str, dict[str, Outcome]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if results:
        fig, ax = plt.subplots(figsize=(8, 4))
        names = list(results)
        models = list(dict.fromkeys(m for r in results.values() for m in r))
        width = 0.8 / max(len(models), 1)
        for k, m in enumerate(models):
            vals = [
                results[n][m].figures["all"]["ndcg@20"] if m in results[n] else 0 for n in names
            ]
            ax.bar(np.arange(len(names)) + k * width, vals, width, label=m)
        ax.set_xticks(np.arange(len(names)) + width * (len(models) - 1) / 2, names)
        ax.set_ylabel("NDCG@20")
        ax.set_title("NDCG@20 by model and protocol")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "metric_by_model.png", dpi=100)
        plt.close(fig)
        files.append("metric_by_model.png")
    for key, title in (
        ("popularity", "item popularity (positives in history)"),
        ("age", "item age"),
    ):
        for name, outcomes in results.items():
            if not any(o.pairs for o in outcomes.values()):
                continue
            fig, ax = plt.subplots(figsize=(8, 4))
            labels = _order(x[key] for o in outcomes.values() for x in o.pairs)
            for m, o in outcomes.items():
                rates = _hit_rate(o.pairs, key)
                ax.plot(labels, [rates.get(g, (np.nan, 0))[0] for g in labels], "o-", label=m)
            counts = _hit_rate(next(iter(outcomes.values())).pairs, key)
            ax.set_xticks(
                range(len(labels)), [f"{g}\n(n={counts.get(g, (0, 0))[1]})" for g in labels]
            )
            ax.set_ylabel("HitRate@20 per test positive")
            ax.set_title(f"protocol {name}: by {title}")
            ax.legend()
            fig.tight_layout()
            fname = f"by_{key}_{name}.png"
            fig.savefig(out / fname, dpi=100)
            plt.close(fig)
            files.append(fname)
    return files


def table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| protocol | model | metric 1 | NDCG@20 | MRR@20 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, models in summary.items():
        for m, v in models.items():
            first = next(iter(v))
            lines.append(
                f"| {key} | {m} | {first} {v[first]:.4f} | {v['ndcg@20']:.4f} | {v['mrr@20']:.4f} |"
            )
    return "\n".join(lines)


METHOD = """\
- Same history, test positives and candidates for every model: every item the user has not
  rated in history (protocol C: not rated so far); protocol B cold-only: the cold items only
  (fusionrec: the ranker's attribute filter `split=cold` on the published items).
- fusionrec: items published to the items topic and onboarded by the worker; history published
  as rating events with their own timestamps, in time order, and folded by the profile agent;
  rankings asked of the gRPC ranker (top 20, exclude_seen). Items carry `created_at` = release
  date where the data set has one. Profile half-life: the settings' value, not fitted. The
  popularity half-life and weight, the image:text weight and the tag-affinity weight are fitted
  on the protocol's history (section below) unless the run says `--no-fit`.
- Waiting for the stack: a marker event for a fresh user goes behind the published events on
  the one partition; the evaluator asks only once it is folded. Protocol C waits so before a
  query whenever the asking user has events not yet confirmed folded; other users' events may
  still be in flight (at most a batch window), as in production.
- most-popular: count of positives in history. BPR (Cornac, k=50, 200 iterations, lr 0.01,
  lambda 0.01): items unseen in training rank after every known item; unknown users get item
  biases. VBPR (Cornac, k=10, k2=20, 30 epochs, lr 0.005, lambda_w 1, lambda_b 0.01) on the
  posters' image vectors (the stack's image encoder): a cold item is scored by its visual term
  theta_u . (E f_i) + beta' . f_i, its bias and latent factors taken as 0; unknown users get
  beta' . f_i. Hyper-parameters: library-example values, not tuned.
- content: per modality, the sum (hence the mean's direction) of the user's positive items'
  vectors (streams.profiles.fold, weight 1, no decay), scored by serving.fusion.fuse (cosine,
  the settings' fixed modality weights); no positive in history: most-popular. Its item vectors
  are computed in-process with the stack's encoders and content path (the stack's Qdrant local
  mode is locked by its process).
- Peers are static (trained once on history). Protocol C adds "(daily)" rows: most-popular,
  BPR and content trained again at the first question of each day (UTC) on every rating
  before it; VBPR is not (about a minute a training here).
  Peers' ties (items a model cannot score) are broken by a seeded random order, not by id.
- Recall@20 = hits / all test positives of the user; NDCG@20 binary, ideal over
  min(20, positives); MRR@20 = 1 / rank of the first hit. Protocol C: per test positive.
- Warm/cold items: rated (any rating) in history or not; returning users: a positive in history.
"""


def markdown(doc: dict[str, Any], plots: list[str]) -> str:
    parts = [
        "# fusionrec evaluation",
        f"Data: `{doc['data']}` ({doc['items']} items, {doc['users']} users, {doc['ratings']} "
        f"ratings); k = {doc['k']}; seed {doc['seed']}; modalities {doc['modalities']}; profile "
        f"half-life {doc['half_life_days']} days (the default, not fitted).",
        "Protocols: ../shared/data/movielens-100k/README.md. fusionrec = the gRPC ranker of an "
        "embedded stack fed through the real topics and agents; peers in-process on the same "
        "history, test positives and candidates.",
        "## Method",
        METHOD,
        "## Summary",
        table(doc["summary"]),
        "## Against the bar (fusionrec NDCG@20 / best peer's)",
        "\n".join(f"- {k}: {v}" for k, v in doc["bars"].items()) or "- no peers in this run",
        "## Weights fitted on history (held-out slice) and what each part is worth",
        FITTED,
        fitted_table(doc["fitted"]),
        "## Counts",
        "```json\n" + json.dumps(doc["counts"], indent=2) + "\n```",
        "## Notes",
        "\n".join(f"- {n}" for n in doc["notes"]) or "- none",
        "## All figures (users and items behind each)",
    ]
    for name, body in doc["protocols"].items():
        parts.append(f"### protocol {name}")
        parts.append("| model | slice | figures |\n| --- | --- | --- |")
        for m, figures in body["models"].items():
            for slice_, v in figures.items():
                text = ", ".join(
                    f"{k} {x:.4f}" if isinstance(x, float) else f"{k} {x}" for k, x in v.items()
                )
                parts[-1] += f"\n| {m} | {slice_} | {text} |"
    parts.append("## Plots")
    parts.extend(f"![{f}]({f})" for f in plots)
    return "\n\n".join(parts) + "\n"


FITTED = """\
Each protocol's history is split again as the test was split from the data (A: its last 20% of
positives by time; B: a fifth of its items held out cold), the first part replayed through the
worker's and the ranker's pure functions, and a grid searched for the best NDCG@20 on the held
out part (fusionrec.fitting). The stack of that protocol runs with the winner. Ablation: the
held-out NDCG@20 with each part taken away, the rest as fitted. Not fitted: the profile
half-life, recency (the ranker ages items by its own clock), the content peer's weights (it
is the fixed-weight baseline)."""


def fitted_table(fitted: dict[str, Any]) -> str:
    if not fitted:
        return "Not fitted in this run (settings as given)."
    rows = [
        "| protocol | chosen settings | variant | held-out NDCG@20 |",
        "| --- | --- | --- | --- |",
    ]
    for name, f in fitted.items():
        chosen = json.dumps(f["settings"])
        for label, value in f["ablation_ndcg@20"].items():
            rows.append(
                f"| {name} ({f['validation_users']} users) | {chosen} | {label} | {value:.4f} |"
            )
            chosen = ""
    return "\n".join(rows)


def last_line(summary: dict[str, Any]) -> str:
    return json.dumps(summary, separators=(",", ":"))


def evaluate(
    data: Path,
    out: Path,
    *,
    protocols: Sequence[str] = ("A", "B", "C"),
    peers: Sequence[str] = (),
    config: Path | None = None,
    max_test_events: int | None = None,
    limit_users: int | None = None,
    limit_items: int | None = None,
    seed: int = 0,
    fit_weights: bool = True,
) -> dict[str, Any]:
    """Run the protocols and write report.json, report.md and the plots into `out`."""
    ds = Dataset.load(data.resolve(), limit_users, limit_items)
    if limit_users or limit_items:
        note = f"development subset: limit_users={limit_users}, limit_items={limit_items}"
    else:
        note = None
    ev = Evaluation(
        ds,
        out,
        peers=peers,
        config=config,
        max_test_events=max_test_events,
        seed=seed,
        fit_weights=fit_weights,
    )
    if note:
        ev.notes.append(note)
    return ev.run(protocols)
