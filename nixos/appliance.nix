# The Oxidize relay appliance: a headless box that relays UDP from first boot.
# Adjust the interface names and route for the hardware it runs on.
{ lib, pkgs, ... }:

{
  system.stateVersion = "26.05";

  networking.hostName = lib.mkDefault "oxidize-relay";
  networking.useNetworkd = true;
  systemd.network.networks."10-uplink" = {
    matchConfig.Name = "en* eth*";
    networkConfig.DHCP = "yes";
  };

  services.openssh = {
    enable = true;
    settings = {
      PasswordAuthentication = false;
      PermitRootLogin = "prohibit-password";
    };
  };

  documentation.enable = false;
  environment.systemPackages = with pkgs; [ ethtool iproute2 tcpdump ];

  services.oxidize-relay = {
    enable = true;
    hugepages = {
      enable = true;
      count = lib.mkDefault 128;
    };
    busyPoll = lib.mkDefault 50;
    settings = lib.mkDefault {
      runtime.mode = "auto";
      interface = [{ name = "eth0"; role = "both"; }];
      nat.ports = "20000-29999";
      route = [{
        listen = "0.0.0.0:51820";
        upstreams = [ "192.0.2.10:51820" ];
      }];
    };
  };
}
