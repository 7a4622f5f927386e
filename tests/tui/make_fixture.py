# Records the committed replay fixture: a plain 16 MiB demo migration, run to the end.
import sys, time
from dataclasses import asdict
from tui.live import LiveSession, Scenario
from tui.transcript import Writer
sc = Scenario(plain=True, run_on=20)
w = Writer(sys.argv[1], asdict(sc))
s = LiveSession(sc, w.write, paused=False, every_step=True)
s.start()
while s.alive: time.sleep(0.05)
s.close(); w.close()
print(w.frames, s.outcome)
