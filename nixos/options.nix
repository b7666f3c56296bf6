# Options of services.oxidize-relay; the implementation is in module.nix.
{ lib, pkgs, ... }:

let
  inherit (lib) mkOption mkEnableOption types literalExpression;
  settingsFormat = pkgs.formats.toml { };
  interfaceTuning = types.submodule {
    options = {
      channels = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        example = 4;
        description = ''
          Combined queue count to set with `ethtool -L`; the relay runs one worker per queue and serves
          them all (leave `settings.interface.*.queues` unset: this is the one place the count is set).
        '';
      };
      disableOffloads = mkOption {
        type = types.bool;
        default = true;
        example = false;
        description = ''
          Turn off offloads that XDP cannot work with (LRO, hardware GRO) and receive VLAN stripping,
          so the program sees frames as they were on the wire.
        '';
      };
      ntupleRules = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "flow-type udp4 dst-port 51820 action 0" "flow-type udp4 dst-port 20000 m 0xfff0 action 1" ];
        description = ''
          `ethtool -N` rules. The relay needs none (any worker relays a reply that lands on its queue);
          they can keep a flow's packets on one core. A rule the NIC refuses is logged, not fatal.
        '';
      };
      pciId = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "8086:1572";
        description = "PCI vendor:device id of this NIC, used to assert that it is not handed to vfio-pci.";
      };
    };
  };
in
{
  options.services.oxidize-relay = {
    enable = mkEnableOption "Oxidize relay, a kernel-bypass UDP relay";

    package = lib.mkPackageOption pkgs "oxidize-relay" { };

    settings = mkOption {
      type = settingsFormat.type;
      default = { };
      # Plain data in its own file, so CI renders it to TOML and checks it with the relay.
      example = import ./settings-example.nix;
      description = ''
        The relay's TOML configuration (see `examples/two-arm.toml` in the source). It is checked with
        `oxidize-relay check-config` when the system is built, so a bad configuration fails the build,
        not the service.
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--mode" "socket" ];
      description = "Extra command-line arguments for `oxidize-relay run`.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = true;
      example = false;
      description = ''
        Open the routes' listen ports in the firewall. AF_XDP traffic never reaches netfilter,
        but the socket backend (fallback) does.
      '';
    };

    hugepages = {
      enable = mkEnableOption "hugepages for the UMEM (reserved at boot)" // { default = true; };
      size = mkOption {
        type = types.enum [ "2M" "1G" ];
        default = "2M";
        example = "1G";
        description = ''
          Hugepage size, made the kernel's default (`default_hugepagesz`): the relay maps its UMEM with
          `MAP_HUGETLB`, which takes pages of the default size. With `1G` each worker's UMEM occupies
          whole 1 GiB pages, so reserve at least one per worker.
        '';
      };
      count = mkOption {
        type = types.ints.unsigned;
        default = 64;
        example = 512;
        description = "Hugepages of `size` reserved on the kernel command line (each worker's UMEM is frames x frame size, rounded up to whole pages).";
      };
    };

    cpu = {
      workerCores = mkOption {
        type = types.listOf types.ints.unsigned;
        default = [ ];
        example = [ 2 3 ];
        description = ''
          Cores for the workers (worker N on the Nth). They are isolated from the scheduler,
          timer ticks and RCU callbacks (`isolcpus`, `nohz_full`, `rcu_nocbs`) and become
          the service's CPUAffinity. Also sets `settings.runtime.cores` unless given.
        '';
      };
      housekeepingCores = mkOption {
        type = types.listOf types.ints.unsigned;
        default = [ ];
        example = [ 0 1 ];
        description = "Cores for IRQs (`irqaffinity`) and every other systemd service (systemd's CPUAffinity).";
      };
    };

    iommu = mkOption {
      type = types.enum [ "off" "intel" "amd" ];
      default = "off";
      example = "intel";
      description = "Turn the IOMMU on in passthrough mode, as vfio needs.";
    };

    vfioPciIds = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "8086:10fb" ];
      description = "PCI vendor:device ids bound to vfio-pci at boot (devices for userspace drivers or VMs, not for the relay).";
    };

    nic = mkOption {
      type = types.attrsOf interfaceTuning;
      default = { };
      example = literalExpression ''{ eth0 = { channels = 2; ntupleRules = [ "flow-type udp4 dst-port 51820 action 0" ]; }; }'';
      description = "Per-interface NIC tuning applied by a oneshot unit before the relay starts.";
    };

    busyPoll = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      example = 50;
      description = "`net.core.busy_poll` and `net.core.busy_read` in microseconds (socket backend latency).";
    };
  };
}
