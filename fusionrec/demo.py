"""`fusionrec demo`: the whole path on the embedded stack, and a cold start beaten on stage.

The default catalog is made here (drawn scenes and written descriptions, six themes), so the
demo needs nothing it may not redistribute; `--data` points it at a MovieLens-style folder.
"""

from __future__ import annotations

import csv
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image, ImageDraw

from fusionrec.cli import console, print_ranking
from fusionrec.launcher import ChildStack, spawn_stack
from fusionrec.publisher import Publisher
from fusionrec.settings import load_settings
from serving.client import RankerClient

THEMES: dict[str, dict[str, Any]] = {
    "ocean": {
        "words": ["Tide", "Reef", "Harbour", "Lagoon", "Current", "Deep Blue", "Coral", "Surf"],
        "text": "waves rolling over a blue sea, coral reefs, whales and the open ocean",
    },
    "forest": {
        "words": ["Pines", "Timber", "Moss", "Canopy", "Fern", "Wildwood", "Oak", "Grove"],
        "text": "a walk through a green forest of tall trees, moss, ferns and birdsong",
    },
    "sunset": {
        "words": ["Dusk", "Ember", "Golden Hour", "Horizon", "Afterglow", "Amber", "Blaze"],
        "text": "an orange sunset over the desert, warm light fading to purple dusk",
    },
    "city": {
        "words": ["Neon", "Skyline", "Downtown", "Metro", "Midnight", "Avenue", "Tower"],
        "text": "city lights at night, skyscrapers, neon signs and busy streets",
    },
    "snow": {
        "words": ["Glacier", "Summit", "Frost", "Avalanche", "Alpine", "Blizzard", "Peak"],
        "text": "snowy mountain peaks, glaciers and a cold white winter landscape",
    },
    "flowers": {
        "words": ["Bloom", "Petal", "Meadow", "Blossom", "Garden", "Tulip", "Daisy"],
        "text": "a meadow full of colourful flowers, tulips and blossoms in spring",
    },
}
FORMATS = ["documentary", "short film", "photo essay", "travel series", "feature"]


def draw(theme: str, rng: np.random.Generator, size: int = 224) -> Image.Image:
    """A scene in the theme's colours and shapes, varied by rng."""
    img = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(img)
    j = lambda c: tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in c)  # noqa: E731
    r = lambda a, b: int(rng.integers(a, b))  # noqa: E731
    if theme == "ocean":
        for y in range(size):
            d.line([(0, y), (size, y)], fill=j((20, 60 + y // 3, 150 + y // 4)))
        for k in range(6):
            y0 = r(20, size)
            pts = [(x, y0 + 8 * np.sin(x / 12 + k)) for x in range(0, size, 4)]
            d.line(pts, fill=(230, 240, 255), width=3)
    elif theme == "forest":
        d.rectangle([0, 0, size, size], fill=j((40, 110, 50)))
        for _ in range(9):
            x = r(0, size)
            d.rectangle([x, r(80, 140), x + 10, size], fill=j((90, 60, 30)))
            d.polygon([(x - 30, 150), (x + 5, r(10, 60)), (x + 40, 150)], fill=j((20, 80, 30)))
    elif theme == "sunset":
        for y in range(size):
            t = y / size
            d.line([(0, y), (size, y)], fill=j((250 - 120 * t, 140 - 100 * t, 40 + 100 * t)))
        c = r(60, 160)
        d.ellipse([c - 30, 120, c + 30, 180], fill=(255, 220, 90))
        d.rectangle([0, 190, size, size], fill=j((120, 70, 30)))
    elif theme == "city":
        d.rectangle([0, 0, size, size], fill=j((10, 10, 35)))
        for _ in range(8):
            x, top = r(0, size - 30), r(40, 160)
            d.rectangle([x, top, x + 30, size], fill=j((50, 50, 60)))
            for _ in range(12):
                wx, wy = r(x + 2, x + 26), r(top + 2, size - 4)
                d.rectangle([wx, wy, wx + 3, wy + 3], fill=(255, 220, 100))
    elif theme == "snow":
        d.rectangle([0, 0, size, size], fill=j((200, 215, 235)))
        for _ in range(4):
            x = r(-40, size)
            d.polygon(
                [(x - 80, size), (x + 20, r(30, 110)), (x + 120, size)], fill=j((120, 130, 150))
            )
            d.polygon([(x - 5, 90), (x + 20, 60), (x + 45, 90)], fill=(250, 250, 255))
    else:  # flowers
        d.rectangle([0, 0, size, size], fill=j((70, 150, 60)))
        for _ in range(25):
            x, y, s = r(0, size), r(0, size), r(6, 16)
            d.ellipse([x - s, y - s, x + s, y + s], fill=j((230, 60 + r(0, 150), 120)))
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(250, 220, 40))
    return img


def make_catalog(media: Path, per_theme: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [
        make_item(media, theme, f"{theme}-{k}", rng) for theme in THEMES for k in range(per_theme)
    ]


def make_item(media: Path, theme: str, item_id: str, rng: np.random.Generator) -> dict[str, Any]:
    spec = THEMES[theme]
    word = spec["words"][int(rng.integers(len(spec["words"])))]
    fmt = FORMATS[int(rng.integers(len(FORMATS)))]
    path = media / f"{item_id}.png"
    draw(theme, rng).save(path)
    return {
        "id": item_id,
        "title": f"{word} {int(rng.integers(1, 99))}",
        "description": f"A {fmt} about {spec['text']}.",
        "image": path.name,
        "category": fmt,
        "tags": [theme],
        "created_at": time.time(),
    }


def demo_events(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Three users with tastes: likes in their theme, a dislike elsewhere."""
    tastes = {"ana": ("ocean", "city"), "ben": ("forest", "sunset"), "chloe": ("city", "flowers")}
    by_theme: dict[str, list[str]] = {}
    for it in items:
        by_theme.setdefault(it["tags"][0], []).append(it["id"])
    events, t = [], time.time() - 3600
    for user, (liked, disliked) in tastes.items():
        for item_id in by_theme[liked][:5]:
            events.append(_event(user, item_id, "like", t))
            t += 1
        events.append(_event(user, by_theme[disliked][0], "dislike", t))
    return events


def _event(user: str, item_id: str, kind: str, t: float, value: float | None = None) -> dict:
    doc = {
        "event_id": str(uuid.uuid4()),
        "user_id": user,
        "item_id": item_id,
        "type": kind,
        "timestamp": t,
    }
    if value is not None:
        doc["value"] = value
    return doc


def movielens_catalog(data: Path, limit: int = 300) -> tuple[list[dict], list[dict], dict, str]:
    """The first `limit` items with poster and plot, the ratings of 30 users on them, and as the
    newcomer an unseen item that the most active of those users rated 5, sharing most genres
    with what that user liked."""
    with (data / "items.csv").open(newline="", encoding="utf-8") as f:
        docs = [
            {
                "id": r["item_id"],
                "title": r["title"],
                "description": r["description"],
                "image": r["poster"],
                "category": r["genres"].split("|")[0] or "unknown",
                "tags": [g for g in r["genres"].split("|") if g],
            }
            for r in csv.DictReader(f)
            if r["poster"] and r["description"]
        ]
    items, rest = docs[:limit], {d["id"]: d for d in docs[limit:]}
    ids = {d["id"] for d in items}
    with (data / "ratings.tsv").open(encoding="utf-8") as f:
        next(f)
        ratings = [line.rstrip("\n").split("\t") for line in f]
    users = sorted({u for u, *_ in ratings}, key=int)[:30]
    liked = {u: [i for v, i, r, _ in ratings if v == u and i in ids and int(r) >= 4] for u in users}
    loved = {
        u: [rest[i] for v, i, r, _ in ratings if v == u and i in rest and r == "5"] for u in users
    }
    user = max((u for u in users if loved[u]), key=lambda u: len(liked[u]))
    tags = {d["id"]: d["tags"] for d in items}
    genres = [g for i in liked[user] for g in tags[i]]
    newcomer = max(loved[user], key=lambda d: sum(genres.count(g) for g in d["tags"]))
    events = [
        _event(u, i, "rating", float(ts), float(r))
        for u, i, r, ts in ratings
        if i in ids and u in users
    ]
    return items, events, newcomer, user


def wait_for(what: str, check: Callable[[], bool], timeout: float = 300.0) -> float:
    start = time.monotonic()
    with console.status(what):
        while not _answered(check):
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"timed out: {what}")
            time.sleep(0.02)
    return time.monotonic() - start


def _answered(check: Callable[[], bool]) -> bool:
    """The check's answer; False while the ranker sheds load (its answer to polling too fast)."""
    try:
        return check()
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        time.sleep(0.2)
        return False


def run_demo(data: Path | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="fusionrec-demo-") as tmp:
        root = Path(tmp)
        media = (data if data else root / "media").resolve()
        if data is None:
            media.mkdir()
            items = make_catalog(media)
            user, newcomer = "ana", make_item(media, "ocean", "ocean-new", np.random.default_rng(7))
            events = demo_events(items)
        else:
            items, events, newcomer, user = movielens_catalog(data)
        console.rule("fusionrec demo: embedded stack")
        stack = spawn_stack(root, {"FUSIONREC_MEDIA__ROOT": str(media)})
        console.print(f"$ fusionrec up  (broker {stack.bootstrap}, ranker {stack.target})")
        try:
            # The drawn catalog is small and clear-cut; a real one ranks among hundreds.
            top = 10 if data is None else 200
            _show(stack, items, events, newcomer, user, top)
        except BaseException:
            console.print(
                f"[red]the demo failed; the stack's last log lines:[/red]\n{stack.log_tail()}"
            )
            raise
        finally:
            stack.stop(30)
            console.print("stack stopped; nothing left running")


def _show(
    stack: ChildStack,
    items: list[dict],
    events: list[dict],
    newcomer: dict,
    user: str,
    top: int,
) -> None:
    client = RankerClient(stack.target, timeout=10)

    def serving() -> bool:
        if stack.process.poll() is not None:
            raise RuntimeError(f"the stack exited with code {stack.process.returncode}")
        return client.serving()

    t = wait_for("starting broker, loading encoders, joining the consumer group", serving)
    console.print(f"stack serving after {t:.1f} s")
    settings = load_settings(kafka={"bootstrap": stack.bootstrap})
    publisher = Publisher(settings)
    publisher.publish_all("items", items)
    console.print(f"published {len(items)} items (text + image)")

    def known(item_id: str) -> bool:
        try:
            client.similar(item_id, 1)
            return True
        except grpc.RpcError:
            return False

    waiting = [i["id"] for i in items]

    def onboarded() -> bool:
        # Ask only about items not seen yet, newest first: polling must not starve the worker.
        while waiting and known(waiting[-1]):
            waiting.pop()
        time.sleep(0.1)
        return not waiting

    t = wait_for("encoding and onboarding the catalog", onboarded)
    console.print(f"catalog onboarded in {t:.1f} s")
    publisher.publish_all("events", events)
    users = sorted({e["user_id"] for e in events})[:3]
    wait_for(
        "folding events into profiles",
        lambda: all(not client.recommend(u, 1).cold_start for u in users),
    )
    console.print(
        f"published {len(events)} events for {len(set(e['user_id'] for e in events))} users"
    )
    for u in [*users, "newcomer-without-history"]:
        r = client.recommend(u, 5)
        note = " (no history: popular and fresh)" if r.cold_start else ""
        print_ranking(f"{u}{note}", r.items)

    console.rule("cold start: a brand-new item nobody has touched")
    publisher.publish_all("items", [newcomer])

    def rank() -> int | None:
        ids = [i.item_id for i in client.recommend(user, top).items]
        return ids.index(newcomer["id"]) + 1 if newcomer["id"] in ids else None

    try:
        t = wait_for(
            f"waiting for {newcomer['id']} in {user}'s top {top}", lambda: bool(rank()), timeout=30
        )
        console.print(
            f"[bold green]{newcomer['id']} ({newcomer['title']!r}) entered {user}'s "
            f"recommendations at #{rank()} {1000 * t:.0f} ms after publish[/bold green]"
        )
    except TimeoutError:
        console.print(f"{newcomer['id']} was not in {user}'s top {top} after 30 s")
    print_ranking(f"{user} now", client.recommend(user, 5).items)
    publisher.close()
    client.close()
