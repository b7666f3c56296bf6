# The relay settings shown as the example of `services.oxidize-relay.settings`
# (plain data: CI renders it to TOML and runs `oxidize-relay check-config` on it).
{
  preset = "secure";
  interface = [
    { name = "eth0"; role = "client"; }
    { name = "eth1"; role = "upstream"; }
  ];
  route = [{ listen = "203.0.113.10:51820"; upstreams = [ "10.20.0.2:51820" ]; }];
}
