# NixOS VM tests. Each runs the scenario scripts of tests/scenarios, the same
# ones `cargo test` runs natively in network namespaces.
{ pkgs, self }:

let
  runTest = file: pkgs.testers.runNixOSTest {
    imports = [ file ];
    defaults = {
      imports = [ self.nixosModules.default ./scenario-runner.nix ];
    };
  };
in
{
  vm-single = runTest ./single-vm.nix;
  vm-three-hosts = runTest ./three-vms.nix;
  vm-kernel-tuning = runTest ./tuning.nix;
  vm-relay-chain = runTest ./chain.nix;
}
