# Three VMs on two vlans: client -> relay (generic XDP on virtio) -> upstream.
# The peers are the scenario suite's peer.py.
let
  relayConfig = {
    runtime.mode = "af_xdp";
    interface = [
      { name = "eth1"; role = "client"; xdp_mode = "generic"; }
      { name = "eth2"; role = "upstream"; xdp_mode = "generic"; }
    ];
    route = [{ listen = "192.168.1.2:5000"; upstreams = [ "192.168.2.3:7000" ]; }];
  };
in
{
  name = "oxidize-relay-three-hosts";

  nodes = {
    client = {
      virtualisation.vlans = [ 1 ];
    };
    relay = {
      virtualisation.vlans = [ 1 2 ];
      services.oxidize-relay = {
        enable = true;
        hugepages.count = 16;
        settings = relayConfig;
      };
    };
    upstream = {
      virtualisation.vlans = [ 2 ];
      networking.firewall.allowedUDPPorts = [ 7000 ];
    };
  };

  testScript = ''
    import json

    start_all()
    relay.wait_for_unit("oxidize-relay.service")
    # Peers keep their default checksum offload: the relay completes partial checksums itself.
    for peer in [client, upstream]:
        peer.wait_for_unit("network.target")
    upstream.succeed("systemd-run --unit oxr-echo oxr-peer echo --bind 192.168.2.3:7000")
    upstream.wait_until_succeeds("ss -Huln 'sport = :7000' | grep -q 7000")

    report = json.loads(client.succeed("oxr-peer client --to 192.168.1.2:5000 --count 20000 --sockets 64").strip().splitlines()[-1])
    assert report["received"] == 20000 and report["corrupt"] == 0, report

    stats = json.loads(relay.succeed("cat /run/oxidize-relay/stats.json"))
    assert stats["backend"] == "af_xdp", stats
    assert all(i["xdp_mode"] == "generic" for i in stats["interfaces"].values()), stats
    assert stats["tx_packets"] >= 40000, stats

    relay.succeed("systemctl stop oxidize-relay.service")
    relay.fail("ip -d link show eth1 | grep -q xdp")
  '';
}
