"""A stand-in for Android's ``adb`` client, for the adb:// target's tests (no phone, no adbd here).

It answers as adb 1.0.41 does for what the target uses: ``devices``, ``-s SERIAL shell COMMAND`` (stdin and
stdout forwarded, the command's exit code returned) and ``-s SERIAL push LOCAL REMOTE``; and it fails as adb
does for a device that is not listed, not authorised or offline, or when several are attached and none is
chosen. The "device" is this machine: commands run in ``sh -c`` here. Devices and states come from
``STANDIN_ADB_DEVICES`` ("SERIAL:state,..."). Every call is appended to ``STANDIN_ADB_LOG`` when set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def devices() -> dict[str, str]:
    out = {}
    for item in os.environ.get("STANDIN_ADB_DEVICES", "").split(","):
        if item.strip():
            serial, _, state = item.strip().partition(":")
            out[serial] = state or "device"
    return out


def fail(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
    sys.exit(1)


def main(argv: list[str]) -> None:
    if os.environ.get("STANDIN_ADB_LOG"):
        with open(os.environ["STANDIN_ADB_LOG"], "a") as log:
            log.write(" ".join(argv) + "\n")
    known = devices()
    serial = None
    if argv[:1] == ["-s"]:
        serial, argv = argv[1], argv[2:]
    if argv[:1] == ["devices"]:
        print("List of devices attached")
        for s, state in known.items():
            print(f"{s}\t{state}")
        print()
        return
    if serial is None:
        if not known:
            fail("adb: no devices/emulators found")
        if len(known) > 1:
            fail("adb: more than one device/emulator")
        serial = next(iter(known))
    if serial not in known:
        fail(f"adb: device '{serial}' not found")
    state = known[serial]
    if state == "unauthorized":
        fail("adb: device unauthorized.\nThis adb server's $ADB_VENDOR_KEYS is not set\nerror: device unauthorized.")
    if state != "device":
        fail(f"adb: device {state}")
    if argv[:1] == ["shell"]:
        proc = subprocess.run(["sh", "-c", " ".join(argv[1:])])
        sys.exit(proc.returncode)
    if argv[:1] == ["push"]:
        local, remote = argv[1], argv[2]
        try:
            shutil.copyfile(local, remote)
        except OSError as e:
            fail(f"adb: error: failed to copy '{local}' to '{remote}': remote {e.strerror}")
        print(f"{local}: 1 file pushed, 0 skipped.")
        return
    fail(f"adb: unknown command {' '.join(argv)}")


if __name__ == "__main__":
    main(sys.argv[1:])
