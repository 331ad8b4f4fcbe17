"""The orbit role: satellite passes over the ground sites, the emulated clock and link states over MQTT.

Modules: `constellation` (Walker shells, TLE files), `sites` (ground sites), `contacts` (passes and
merged link-up windows), `link` (elevation, slant range, delay), `plan` (a whole contact plan and its
exports), `publisher` (MQTT), `cli` (`emsfl orbit ...`). Never imports torch, transformers or gRPC.
"""
