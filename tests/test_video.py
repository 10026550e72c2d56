"""Video items: key frames through the image encoder, the sound track through the audio encoder,
with real PyAV decoding and real encoder weights."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from encoders.base import EncodeError, Encoder
from encoders.registry import build_encoders
from fusionrec.settings import EncoderSettings, Settings
from streams.catalog import Catalog
from streams.media import MediaError
from streams.records import ItemRecord
from streams.video import split_video

RATE = 22_050


def make_video(seconds: float = 2.0, fps: int = 10, size: int = 64, sound: bool = True) -> bytes:
    """A Matroska clip (MPEG-4 part 2 video, PCM sound), both encoders FFmpeg's own."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        video = out.add_stream("mpeg4", rate=fps)
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        video.gop_size = 5
        audio = out.add_stream("pcm_s16le", rate=RATE) if sound else None
        if audio is not None:
            audio.layout = "mono"
        for i in range(int(seconds * fps)):
            img = np.zeros((size, size, 3), np.uint8)
            img[..., i % 3] = 200
            img[: size // 2, :, (i + 1) % 3] = 90
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        out.mux(video.encode())
        if audio is not None:
            t = np.arange(int(seconds * RATE)) / RATE
            samples = (9000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
            for start in range(0, len(samples), 1024):
                frame = av.AudioFrame.from_ndarray(
                    samples[None, start : start + 1024], format="s16", layout="mono"
                )
                frame.sample_rate = RATE
                out.mux(audio.encode(frame))
            out.mux(audio.encode())
    return buf.getvalue()


@pytest.fixture(scope="module")
def encoders() -> dict[str, Encoder]:
    return build_encoders(EncoderSettings(enabled=["image", "audio"], threads=2, batch_size=8))


def test_split_video_gives_key_frames_and_sound() -> None:
    clip = split_video(make_video(), frames=4, max_seconds=600, max_pixels=10_000)
    assert 1 <= len(clip.frames) <= 4
    assert all(Image.open(io.BytesIO(f)).size == (64, 64) for f in clip.frames)
    assert clip.audio is not None
    samples, rate = sf.read(io.BytesIO(clip.audio))
    assert rate == RATE and samples.ndim == 1
    assert len(samples) == pytest.approx(2 * RATE, rel=0.05)
    cut = split_video(make_video(), frames=4, max_seconds=0.5, max_pixels=10_000)
    assert cut.audio is not None and len(sf.read(io.BytesIO(cut.audio))[0]) == RATE // 2


def test_split_video_refuses_what_it_cannot_use() -> None:
    assert split_video(make_video(sound=False), 4, 600, 10_000).audio is None
    with pytest.raises(MediaError, match="cannot be decoded"):
        split_video(b"not a video at all" * 100, 4, 600, 10_000)
    wav = io.BytesIO()
    sf.write(wav, np.zeros(RATE, np.float32), RATE, format="WAV")
    with pytest.raises(MediaError, match="no video stream"):
        split_video(wav.getvalue(), 4, 600, 10_000)
    with pytest.raises(MediaError, match="over 1000 pixels"):
        split_video(make_video(), 4, 600, max_pixels=1000)


# Modalities one after another, or side by side on two threads: the same vectors and errors.
@pytest.mark.parametrize("threads", [1, 2])
def test_a_video_item_gets_image_and_audio_vectors(
    encoders: dict[str, Encoder], tmp_path, threads: int
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        media={"root": tmp_path, "video_frames": 4},
        worker={"encode_threads": threads},
    )
    (tmp_path / "clip.mkv").write_bytes(make_video())
    (tmp_path / "silent.mkv").write_bytes(make_video(sound=False))
    (tmp_path / "broken.mkv").write_bytes(make_video()[:300])
    catalog = Catalog(None, settings, encoders)  # type: ignore[arg-type]  # encode only
    assert (catalog.pool is None) == (threads == 1)
    items = [
        ItemRecord(id="v", video="clip.mkv"),
        ItemRecord(id="s", video="silent.mkv"),
        ItemRecord(id="b", video="broken.mkv"),
    ]
    got = catalog.encode(items)
    image, audio = encoders["image"], encoders["audio"]
    assert isinstance(got[0], dict) and set(got[0]) == {image.vector_name, audio.vector_name}
    clip = split_video(make_video(), 4, 600, 10_000)
    frames = np.array([v for v in image.encode_batch(clip.frames) if isinstance(v, np.ndarray)])
    mean = frames.mean(axis=0)
    np.testing.assert_allclose(got[0][image.vector_name], mean / np.linalg.norm(mean), atol=1e-5)
    assert isinstance(got[1], dict) and set(got[1]) == {image.vector_name}
    assert isinstance(got[2], EncodeError) and "video" in str(got[2])


def test_an_items_own_image_comes_before_its_video(encoders: dict[str, Encoder], tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, media={"root": tmp_path})
    poster = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(poster, format="PNG")
    (tmp_path / "poster.png").write_bytes(poster.getvalue())
    (tmp_path / "clip.mkv").write_bytes(make_video())
    catalog = Catalog(None, settings, encoders)  # type: ignore[arg-type]
    both, alone = catalog.encode(
        [
            ItemRecord(id="a", image="poster.png", video="clip.mkv"),
            ItemRecord(id="p", image="poster.png"),
        ]
    )
    name = encoders["image"].vector_name
    assert isinstance(both, dict) and isinstance(alone, dict)
    np.testing.assert_allclose(both[name], alone[name], atol=1e-6)
