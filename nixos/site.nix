# This appliance's site: which NICs relay, what they relay to, who may log in.
# Fill it in before `nix build .#iso` (nixos/site-example.nix shows every field);
# the build stops with a message naming what is missing.
{
  oxidize-relay.appliance = {
    relayInterfaces = [ ];
    routes = [ ];
    sshAuthorizedKeys = [ ];
  };
}
