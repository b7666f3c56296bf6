# `nix flake check`: the NixOS VM tests, lint and format gates, and the module's option docs.
{ pkgs, self, oxidize-relay }:

let
  cargoGate = name: command: oxidize-relay.overrideAttrs (previous: {
    pname = "oxidize-relay-${name}";
    nativeBuildInputs = previous.nativeBuildInputs ++ [ pkgs.clippy pkgs.rustfmt ];
    buildPhase = ''
      runHook preBuild
      ${command}
      runHook postBuild
    '';
    doCheck = false;
    installPhase = "touch $out";
  });

  moduleEval = pkgs.lib.evalModules {
    modules = [
      { _module.check = false; }
      ./../nixos/options.nix
    ];
    specialArgs = { inherit pkgs; };
  };
in
import ../tests/nixos { inherit pkgs self; } // {
  clippy = cargoGate "clippy" "cargo clippy --workspace --all-targets --offline -- -D warnings";
  rustfmt = cargoGate "rustfmt" "cargo fmt --all --check";
  option-docs = (pkgs.nixosOptionsDoc {
    options = { inherit (moduleEval.options) services; };
    warningsAreErrors = true;
  }).optionsCommonMark;
}
