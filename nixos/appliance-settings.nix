# The appliance's relay settings, from the site's description (see appliance.nix).
# Plain data, no nixpkgs: CI renders it to TOML and runs `oxidize-relay check-config` on it.
site:
{
  runtime.mode = "auto";
  interface = map (nic: { inherit (nic) name role; }) site.relayInterfaces;
  nat.ports = "20000-29999";
  route = site.routes;
}
