# An example site for the appliance (addresses from the documentation ranges).
# Copy the values into `oxidize-relay.appliance` in nixos/site.nix for a real box.
{
  relayInterfaces = [
    { name = "relay0"; role = "both"; macAddress = "02:00:5e:10:00:01"; }
  ];
  routes = [{ listen = "0.0.0.0:51820"; upstreams = [ "192.0.2.10:51820" ]; }];
  sshAuthorizedKeys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyReplaceMe operator@example" ];
}
