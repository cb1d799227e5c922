"""The reference notebook's input pipeline, timed: the baseline for `loader bench`.

Streams the .tgz with Python's tarfile, decodes each JPEG with cv2.imdecode, takes the centred
square, cv2.resize to --img-size, converts to float32 with Keras' InceptionV3 preprocess_input
(x / 127.5 - 1) and stacks batches of 32. One thread (cv2.setNumThreads(1)).
Prints `images_per_s=<n>` (wall clock) and the process CPU time.
"""

import argparse
import tarfile
import time

import cv2
import numpy as np

BATCH_SIZE = 32


def preprocess_input(x):
    return x / 127.5 - 1.0


def load_image(data, img_size):
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[top : top + side, left : left + side]
    image = cv2.resize(image, (img_size, img_size))
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return preprocess_input(image.astype(np.float32))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="102flowers .tgz or .tar")
    parser.add_argument("--img-size", type=int, default=299)
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    args = parser.parse_args()
    cv2.setNumThreads(1)

    start, cpu_start = time.perf_counter(), time.process_time()
    images = skipped = batches = 0
    batch = []
    with tarfile.open(args.data, "r:*") as archive:
        for member in archive:
            if not (member.isfile() and member.name.lower().endswith(".jpg")):
                continue
            if args.limit is not None and images + skipped >= args.limit:
                break
            image = load_image(archive.extractfile(member).read(), args.img_size)
            if image is None:
                skipped += 1
                continue
            images += 1
            batch.append(image)
            if len(batch) == BATCH_SIZE:
                np.stack(batch)
                batches += 1
                batch = []
    if batch:
        np.stack(batch)
        batches += 1
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    print(
        f"images={images} skipped={skipped} batches={batches} "
        f"seconds={seconds:.3f} cpu_seconds={cpu_seconds:.3f}"
    )
    print(f"images_per_s={images / seconds:.1f}")


if __name__ == "__main__":
    main()
