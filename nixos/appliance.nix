# The Oxidize relay appliance: a headless box that relays UDP from first boot.
# Real hardware names NICs predictably (enp3s0f0), so the relay's NICs are named
# here by MAC address or PCI path (systemd .link files) and the relay uses those names.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption types;
  cfg = config.oxidize-relay.appliance;
  # Every leaf its own default, so an operator can override one key without losing the rest.
  defaultEach = value: if lib.isAttrs value then lib.mapAttrs (_: defaultEach) value else lib.mkDefault value;
  relayInterface = types.submodule {
    options = {
      name = mkOption {
        type = types.strMatching "[a-zA-Z][a-zA-Z0-9_-]{0,14}";
        example = "relay0";
        description = "Name the NIC gets (and the relay uses).";
      };
      role = mkOption {
        type = types.enum [ "both" "client" "upstream" ];
        default = "both";
        example = "client";
        description = "`both` for one-arm, else the side of a two-arm relay this NIC faces.";
      };
      macAddress = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "3c:ec:ef:12:34:56";
        description = "Match the NIC by its MAC address.";
      };
      pciPath = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "pci-0000:03:00.0";
        description = "Match the NIC by its PCI path (`udevadm info /sys/class/net/IF | grep ID_PATH=`).";
      };
    };
  };
in
{
  options.oxidize-relay.appliance = {
    relayInterfaces = mkOption {
      type = types.listOf relayInterface;
      default = [ ];
      example = [{ name = "relay0"; role = "both"; macAddress = "3c:ec:ef:12:34:56"; }];
      description = "The NICs the relay serves, each matched by MAC address or PCI path and given a stable name.";
    };
    routes = mkOption {
      type = types.listOf (types.attrsOf types.anything);
      default = [ ];
      example = [{ listen = "0.0.0.0:51820"; upstreams = [ "192.0.2.10:51820" ]; }];
      description = "The relay's routes (`[[route]]` of the relay's configuration).";
    };
    sshAuthorizedKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "ssh-ed25519 AAAA... operator@example" ];
      description = "Public keys that may log in as root over SSH (the only way in besides the console).";
    };
  };

  config = {
    assertions = [
      {
        assertion = cfg.relayInterfaces != [ ];
        message = "oxidize-relay.appliance.relayInterfaces is empty: name the NICs the relay serves by MAC address or PCI path (nixos/site.nix).";
      }
      {
        assertion = lib.all (nic: (nic.macAddress != null) != (nic.pciPath != null)) cfg.relayInterfaces;
        message = "oxidize-relay.appliance.relayInterfaces: give each NIC exactly one of macAddress and pciPath.";
      }
      {
        assertion = cfg.routes != [ ];
        message = "oxidize-relay.appliance.routes is empty: say what the relay listens on and relays to (nixos/site.nix).";
      }
      {
        assertion = cfg.sshAuthorizedKeys != [ ];
        message = "oxidize-relay.appliance.sshAuthorizedKeys is empty: SSH takes keys only, so without one the box is reachable from its console alone.";
      }
    ];

    system.stateVersion = "26.05";

    networking.hostName = lib.mkDefault "oxidize-relay";
    networking.useNetworkd = true;
    systemd.network.links = lib.listToAttrs (map
      (nic: lib.nameValuePair "10-${nic.name}" {
        matchConfig = if nic.macAddress != null then { PermanentMACAddress = nic.macAddress; } else { Path = nic.pciPath; };
        linkConfig.Name = nic.name;
      })
      cfg.relayInterfaces);
    systemd.network.networks."10-uplink" = {
      matchConfig.Name = "en* eth* relay*";
      networkConfig.DHCP = "yes";
    };

    services.openssh = {
      enable = true;
      settings = {
        PasswordAuthentication = false;
        PermitRootLogin = "prohibit-password";
      };
    };
    users.users.root.openssh.authorizedKeys.keys = cfg.sshAuthorizedKeys;

    documentation.enable = lib.mkDefault false;
    environment.systemPackages = with pkgs; [ ethtool iproute2 tcpdump ];

    services.oxidize-relay = {
      enable = true;
      hugepages = {
        enable = true;
        count = lib.mkDefault 128;
      };
      busyPoll = lib.mkDefault 50;
      settings = defaultEach (import ./appliance-settings.nix cfg);
    };
  };
}
