"""The orbit role: satellite passes over the ground sites, the emulated clock and link states over MQTT.

Modules: `constellation` (Walker shells, TLE and OMM files), `sites` (ground sites, azimuth masks),
`fast` (the vectorised contact finder: all satellites and sites at once), `contacts` (the skyfield reference
finder, contacts and windows), `selection` (serving satellite per window and handovers), `link` (geometry,
delay, rate and loss model), `plan` (a whole contact plan, its exports and replay import), `publisher`
(MQTT, clock control, overrides), `commands` (operator commands on `emsfl/v1/orbit/cmd/<verb>`), `shaper`
(tc netem on real traffic), `cli` (`emsfl orbit run|plan|override|shaper`). Never imports torch,
transformers or gRPC.
"""
