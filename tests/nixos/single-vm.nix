# One VM: client, relay and upstream namespaces over veth inside it. The relay
# runs through the module (in the relay namespace), then the native scenarios run unchanged.
{
  name = "oxidize-relay-single-vm";

  nodes.machine = { lib, ... }: {
    virtualisation.cores = 2;
    virtualisation.memorySize = 4096;
    services.oxidize-relay = {
      enable = true;
      hugepages.count = 16;
      settings = {
        runtime.mode = "af_xdp";
        interface = [
          { name = "rc0"; role = "client"; }
          { name = "ru0"; role = "upstream"; }
        ];
        route = [{ listen = "10.1.0.1:5000"; upstreams = [ "10.2.0.2:7000" ]; }];
      };
    };
    # Started by the test once the topology exists, inside its relay namespace.
    systemd.services.oxidize-relay = {
      wantedBy = lib.mkForce [ ];
      serviceConfig.NetworkNamespacePath = "/run/netns/oxv-relay";
    };
  };

  testScript = ''
    machine.wait_for_unit("multi-user.target")

    with subtest("the module's relay carries traffic in the scenario topology"):
        machine.succeed("oxr-scenario --prefix oxv topology-up")
        machine.succeed("systemctl start oxidize-relay.service")
        machine.wait_for_unit("oxidize-relay.service")
        machine.succeed("oxr-scenario --prefix oxv running-relay --stats-file /run/oxidize-relay/stats.json")
        machine.succeed("systemctl stop oxidize-relay.service")
        machine.fail("ip -n oxv-relay -d link show rc0 | grep -q xdp")
        machine.succeed("oxr-scenario --prefix oxv topology-down")

    # Every scenario of tests/scenarios/run.py runs here or in chain.nix (a cargo test checks that).
    both_backends = [
        "ipv4-one-arm", "ipv6-one-arm", "ipv4-two-arm", "ipv6-two-arm", "many-clients", "session-expiry",
        "tcp-coexistence", "least-privilege", "oversize", "reload", "drain", "upstream-health", "proxy-protocol", "path-mtu", "icmp-errors", "restart-continuity", "metrics-abuse",
    ]
    af_xdp_only = [
        "four-queues", "tx-pressure", "unserved-queues", "never-sessions", "stale-neighbour", "route-deleted",
        "interface-deleted", "restart-after-sigkill", "exhaustion", "under-attack", "flood",
        "sigkill-fallback", "capability-fallback", "l3-interface-fallback",
    ]
    for backend in ["af_xdp", "socket"]:
        for scenario in both_backends:
            with subtest(f"{scenario} ({backend})"):
                machine.succeed(f"oxr-scenario --backend {backend} {scenario}")
    for scenario in af_xdp_only:
        with subtest(scenario):
            machine.succeed(f"oxr-scenario {scenario}")
  '';
}
