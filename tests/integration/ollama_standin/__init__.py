"""The image of the Ollama STAND-IN (``server.py``): no Ollama image is reachable from the test machines.

``ensure_standin_image(client)`` returns :data:`STANDIN_IMAGE`, built ``FROM`` the local Debian
python base image (``tests/integration/base_image.py``) with ``server.py`` copied in. Like
Ollama's image its entrypoint is ``/bin/ollama`` (here a two-line launcher of ``server.py``), it
runs ``serve`` by default and listens on ``OLLAMA_HOST=0.0.0.0:11434`` unless told otherwise, and
it carries Perl (Debian's ``perl-base``, as Ubuntu's under Ollama's image), which localllm's relay
needs. The image carries a label with a key of ``server.py`` and the base image, so a changed server
(or a rebuilt base) rebuilds it; otherwise it is reused as it is. No network is needed: the build
never pulls, and its one ``RUN`` writes the launcher.

What the stand-in does, and which behaviour of Ollama's source each setting (``OLLAMA_*`` and
``STANDIN_*`` environment variables) mirrors, is in ``server.py``'s docstrings; its own
``GET /standin/stats`` counts loads, reloads, unloads, evictions and pulls, for tests to assert on.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import docker

from ..base_image import cache_dir, ensure_base_image, locked

STANDIN_IMAGE = "localllm/ollama-standin:test"
KEY_LABEL = "io.localllm.standin-key"
SERVER = Path(__file__).with_name("server.py")
DOCKERFILE = """\
FROM {base}
COPY server.py /standin/server.py
RUN printf '#!/bin/sh\\nexec python3 /standin/server.py "$@"\\n' > /bin/ollama && chmod 755 /bin/ollama
ENV OLLAMA_HOST=0.0.0.0:11434 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 11434
ENTRYPOINT ["/bin/ollama"]
CMD ["serve"]
"""


def standin_key(base_image_id: str) -> str:
    """A key of what the image is made of: server.py, the Dockerfile and the base image."""
    recipe = SERVER.read_bytes() + DOCKERFILE.encode() + base_image_id.encode()
    return hashlib.sha256(recipe).hexdigest()[:16]


def _image(client: docker.DockerClient):
    try:
        return client.images.get(STANDIN_IMAGE)
    except docker.errors.ImageNotFound:
        return None


def ensure_standin_image(client: docker.DockerClient) -> str:
    """Return :data:`STANDIN_IMAGE`, built now if it is missing or was made from another server.py or base."""
    base = ensure_base_image(client)
    key = standin_key(client.images.get(base).id)
    image = _image(client)
    if image is not None and (image.labels or {}).get(KEY_LABEL) == key:
        return STANDIN_IMAGE
    with locked(cache_dir() / "ollama-standin.lock"):
        image = _image(client)  # another process may have built it meanwhile
        if image is not None and (image.labels or {}).get(KEY_LABEL) == key:
            return STANDIN_IMAGE
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="ollama-standin-") as context:
            shutil.copy(SERVER, Path(context) / "server.py")
            (Path(context) / "Dockerfile").write_text(DOCKERFILE.format(base=base))
            built, _ = client.images.build(
                path=context,
                tag=STANDIN_IMAGE,
                labels={KEY_LABEL: key},
                pull=False,
                rm=True,
                forcerm=True,
                network_mode="none",
            )
        print(
            f"ollama_standin: built {STANDIN_IMAGE} in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True
        )
        if image is not None and image.id != built.id:  # the image this one replaces, now untagged
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(image.id, noprune=False)
    return STANDIN_IMAGE
