"""The seeded fault explorer: random schedules of app operations, kills and store faults against
real daemons, judged by an oracle; any failing schedule replays from its seed (README)."""
