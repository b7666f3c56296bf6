# A relay chain in one VM: client -> relay A -> OxTunnel hop -> relay B -> upstream,
# both relays on AF_XDP and then both on the socket backend; the same chain scenario `cargo test` runs.
{
  name = "oxidize-relay-chain";

  nodes.machine = {
    virtualisation.cores = 2;
  };

  testScript = ''
    machine.wait_for_unit("multi-user.target")
    scenario = "chain"
    for backend in ["af_xdp", "socket"]:
        with subtest(f"{scenario} ({backend})"):
            machine.succeed(f"oxr-scenario --backend {backend} {scenario}")
  '';
}
