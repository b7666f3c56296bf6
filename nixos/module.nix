# services.oxidize-relay: the relay as a hardened systemd service, plus the host
# tuning it wants (hugepages, CPU isolation, IOMMU/vfio, NIC settings, sysctls).
{ config, lib, pkgs, utils, ... }:

let
  cfg = config.services.oxidize-relay;
  settingsFormat = pkgs.formats.toml { };

  cores = lib.concatMapStringsSep "," toString;
  natPorts = cfg.settings.nat.ports or "20000-29999";
  listenPort = route: lib.toInt (lib.last (lib.splitString ":" route.listen));
  interfaceNames = map (i: i.name) (cfg.settings.interface or [ ]);

  settings = lib.recursiveUpdate
    (lib.optionalAttrs (cfg.cpu.workerCores != [ ]) { runtime.cores = cfg.cpu.workerCores; })
    cfg.settings;

  # Rendered and checked by the relay itself at build time (the file alone: key files are
  # secrets outside the store, checked by the relay when it starts).
  configFile = pkgs.runCommand "oxidize-relay.toml"
    {
      nativeBuildInputs = [ cfg.package ];
      rendered = settingsFormat.generate "oxidize-relay-unchecked.toml" settings;
    } ''
    oxidize-relay check-config --file-only "$rendered"
    cp "$rendered" "$out"
  '';

  # What the relay cannot change while it runs (it says so and keeps the old config on a
  # reload): when any of it changes, nixos-rebuild restarts the service; when only routes
  # and limits change, it reloads (SIGHUP), and live sessions carry on.
  restartOnly = builtins.toJSON (removeAttrs settings [ "route" "security" ] // {
    source_table_entries = settings.security.source_table_entries or null;
  });

  # Each step is tried and a failure logged; none stops the relay from starting: a wrong
  # channel count is refused by the relay itself with the fix, and the rest are optimisations.
  nicTuning = ''
    failed=0
    step() { "$@" || { echo "oxidize-relay NIC tuning: '$*' failed" >&2; failed=1; }; }
  '' + lib.concatStrings (lib.mapAttrsToList
    (name: nic: ''
      ${lib.optionalString (nic.channels != null) "step ethtool -L ${name} combined ${toString nic.channels}"}
      ${lib.optionalString nic.disableOffloads "step ethtool -K ${name} lro off rx-gro-hw off rxvlan off"}
      ${lib.concatMapStrings (rule: "step ethtool -N ${name} ${rule}\n") nic.ntupleRules}
    '')
    cfg.nic) + ''
    [ "$failed" = 0 ] || echo "oxidize-relay NIC tuning: some steps failed (above); the relay starts anyway" >&2
  '';
  nicDevices = map (name: "sys-subsystem-net-devices-${utils.escapeSystemdPath name}.device") (lib.attrNames cfg.nic);
  queuesOf = interface: interface.queues or null;
in
{
  imports = [ ./options.nix ];

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.settings ? route && cfg.settings ? interface;
        message = "services.oxidize-relay.settings needs at least one `interface` and one `route`.";
      }
      {
        assertion = lib.all (nic: nic.pciId == null || !(lib.elem nic.pciId cfg.vfioPciIds)) (lib.attrValues cfg.nic);
        message = "services.oxidize-relay: an interface the relay uses through AF_XDP is listed in vfioPciIds; vfio-pci would take it from the kernel.";
      }
      {
        assertion = lib.all (name: lib.elem name interfaceNames) (lib.attrNames cfg.nic);
        message = "services.oxidize-relay.nic names an interface that settings.interface does not.";
      }
      {
        # One source of truth for the queue count: the NIC's channels (the relay serves them all).
        assertion = lib.all
          (interface: !(cfg.nic ? ${interface.name}) || cfg.nic.${interface.name}.channels == null
            || queuesOf interface == null || queuesOf interface == cfg.nic.${interface.name}.channels)
          (cfg.settings.interface or [ ]);
        message = "services.oxidize-relay: settings.interface.*.queues differs from nic.<name>.channels; leave queues unset (the relay serves every channel).";
      }
      {
        assertion = lib.intersectLists cfg.cpu.workerCores cfg.cpu.housekeepingCores == [ ];
        message = "services.oxidize-relay.cpu: worker and housekeeping cores must not overlap.";
      }
    ];

    boot.kernelParams =
      lib.optionals cfg.hugepages.enable [
        "default_hugepagesz=${cfg.hugepages.size}"
        "hugepagesz=${cfg.hugepages.size}"
        "hugepages=${toString cfg.hugepages.count}"
      ]
      ++ lib.optionals (cfg.cpu.workerCores != [ ]) [
        "isolcpus=managed_irq,domain,${cores cfg.cpu.workerCores}"
        "nohz_full=${cores cfg.cpu.workerCores}"
        "rcu_nocbs=${cores cfg.cpu.workerCores}"
      ]
      ++ lib.optional (cfg.cpu.housekeepingCores != [ ]) "irqaffinity=${cores cfg.cpu.housekeepingCores}"
      ++ lib.optionals (cfg.iommu == "intel") [ "intel_iommu=on" "iommu=pt" ]
      ++ lib.optionals (cfg.iommu == "amd") [ "amd_iommu=on" "iommu=pt" ]
      ++ lib.optional (cfg.vfioPciIds != [ ]) "vfio-pci.ids=${lib.concatStringsSep "," cfg.vfioPciIds}";

    boot.kernelModules = lib.optionals (cfg.vfioPciIds != [ ]) [ "vfio" "vfio_pci" "vfio_iommu_type1" ];

    # 2 MiB pages are mounted by systemd at /dev/hugepages; 1 GiB pages need a mount of their own.
    # A mount unit, not `fileSystems`: image builders (the ISO) replace `fileSystems` wholesale.
    systemd.mounts = lib.optional (cfg.hugepages.enable && cfg.hugepages.size == "1G") {
      what = "hugetlbfs";
      where = "/dev/hugepages1G";
      type = "hugetlbfs";
      options = "pagesize=1G,mode=1770";
      wantedBy = [ "oxidize-relay.service" ];
      before = [ "oxidize-relay.service" ];
    };

    boot.kernel.sysctl = {
      # NAT ports belong to the relay: the kernel must not hand them out as ephemeral ports.
      "net.ipv4.ip_local_reserved_ports" = natPorts;
    } // lib.optionalAttrs (cfg.busyPoll != null) {
      "net.core.busy_poll" = cfg.busyPoll;
      "net.core.busy_read" = cfg.busyPoll;
    };

    systemd.settings.Manager = lib.mkIf (cfg.cpu.housekeepingCores != [ ]) {
      CPUAffinity = cores cfg.cpu.housekeepingCores;
    };

    networking.firewall.allowedUDPPorts = lib.mkIf cfg.openFirewall (map listenPort (cfg.settings.route or [ ]));

    systemd.services.oxidize-relay-nic = lib.mkIf (cfg.nic != { }) {
      description = "NIC tuning for Oxidize relay";
      before = [ "oxidize-relay.service" ];
      wantedBy = [ "oxidize-relay.service" ];
      # The NICs must exist (drivers load late on real hardware); a missing one fails this unit, logged.
      requires = nicDevices;
      after = [ "network-pre.target" ] ++ nicDevices;
      path = [ pkgs.ethtool ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      script = nicTuning;
    };

    # A fixed path, so a settings change alters the file, not the unit: the unit reloads.
    environment.etc."oxidize-relay/config.toml".source = configFile;

    systemd.services.oxidize-relay = {
      description = "Oxidize relay (kernel-bypass UDP relay)";
      reloadTriggers = [ configFile ];
      restartTriggers = [ restartOnly ];
      # One `systemctl restart`, not stop + start: a stop would delete the runtime directory
      # and the sessions the old process leaves there for the new one.
      stopIfChanged = false;
      documentation = [ "https://github.com/oxidize-relay/oxidize-relay" ];
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        WatchdogSec = "30s";
        ExecStart = lib.escapeShellArgs ([
          (lib.getExe cfg.package)
          "run"
          "--config"
          "/etc/oxidize-relay/config.toml"
          "--stats-file"
          "/run/oxidize-relay/stats.json"
        ] ++ cfg.extraArgs);
        # Re-reads /etc/oxidize-relay/config.toml; a bad file is refused and logged, the old config stays.
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        Restart = "on-failure";
        RestartSec = "2s";

        DynamicUser = true;
        # Also where a stopping relay leaves its live sessions (sessions.json, found through
        # $RUNTIME_DIRECTORY) for the next start: kept across restarts, removed on stop.
        RuntimeDirectory = "oxidize-relay";
        RuntimeDirectoryPreserve = "restart";
        # Exactly what XDP and AF_XDP need: attach programs and sockets, load BPF, lock the UMEM.
        AmbientCapabilities = [ "CAP_NET_ADMIN" "CAP_NET_RAW" "CAP_BPF" "CAP_PERFMON" "CAP_IPC_LOCK" ];
        CapabilityBoundingSet = [ "CAP_NET_ADMIN" "CAP_NET_RAW" "CAP_BPF" "CAP_PERFMON" "CAP_IPC_LOCK" ];
        LimitMEMLOCK = "infinity";
        CPUAffinity = lib.mkIf (cfg.cpu.workerCores != [ ]) (cores (cfg.cpu.workerCores ++ cfg.cpu.housekeepingCores));

        RestrictAddressFamilies = [ "AF_XDP" "AF_NETLINK" "AF_UNIX" "AF_INET" "AF_INET6" ];
        SystemCallFilter = [ "@system-service" "bpf" ];
        SystemCallArchitectures = "native";
        ReadWritePaths = [ "/sys/fs/bpf" ];
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectKernelLogs = true;
        ProtectKernelModules = true;
        ProtectKernelTunables = true;
        ProtectControlGroups = true;
        ProtectProc = "invisible";
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        UMask = "0077";
      };
    };
  };
}
