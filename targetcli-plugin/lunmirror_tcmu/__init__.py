"""targetcli-side integration of lunmirror's TCMU frontend (`user:mirror`).

- `cfgstring`: the `user:mirror` cfgstring rules (same as src/tcmu/cfgstring.rs,
  checked against the shared vectors in tests/cfgstring_vectors.json);
- `dbus_service`: the org.kernel.TCMUService1 D-Bus service targetcli asks for
  `user:<subtype>` handlers (ConfigDesc, CheckConfig), standalone or registered
  with tcmu-runner's HandlerManager1;
- `control`: a JSON-RPC client of the daemon's control socket;
- `cli`: `lunmirror-targetcli`, replication commands for user:mirror objects.
"""

__version__ = "0.1.0"
SUBTYPE = "mirror"
