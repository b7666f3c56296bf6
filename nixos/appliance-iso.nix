# What the appliance's ISO changes about nixpkgs' installer profile, each on purpose.
{ config, lib, ... }:

{
  # The installer profile brings NetworkManager; the appliance configures its NICs with systemd-networkd.
  networking.networkmanager.enable = lib.mkForce false;
  networking.wireless.enable = lib.mkForce false;
  # The installer turns documentation on; the appliance ships without it, as when installed.
  documentation.enable = lib.mkForce false;
  # The image's own file systems replace `fileSystems` wholesale; the relay's 1 GiB hugepage
  # mount is a systemd mount unit (nixos/module.nix) so it survives, and this says so at build time.
  assertions = [{
    assertion = !(config.services.oxidize-relay.hugepages.enable && config.services.oxidize-relay.hugepages.size == "1G")
      || lib.any (m: m.where == "/dev/hugepages1G") config.systemd.mounts;
    message = "the appliance ISO lost the 1 GiB hugepage mount";
  }];
}
