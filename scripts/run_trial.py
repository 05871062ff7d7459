"""Run the trial suite and print "N passed, N failed" as the last line.

trial's own summary ("PASSED (successes=12)") is parsed, not trusted blindly:
a run that ends without a summary counts as one failure.
"""

import re
import subprocess
import sys


def main(argv):
    cmd = [sys.executable, "-m", "twisted.trial", "--temp-directory", "_trial_temp", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    summary = None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if re.match(r"^(PASSED|FAILED) \(", line):
            summary = line
    code = proc.wait()
    if summary is None:
        print("0 passed, 1 failed")
        return 1
    counts = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", summary))
    passed = counts.get("successes", 0) + counts.get("expectedFailures", 0)
    failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
    skipped = counts.get("skips", 0)
    tail = f", {skipped} skipped" if skipped else ""
    print(f"{passed} passed, {failed} failed{tail}")
    return 0 if failed == 0 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
