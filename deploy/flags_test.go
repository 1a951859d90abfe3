package deploy

import (
	"context"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
)

// contractFlags are the flags of the shared contract (each with an env
// twin KUBEZONNET_<FLAG>); the server also has every flag of
// internal/remotewrite's Flags. Manifests may only use these; once a subcommand
// exists in the binary, TestManifestFlagsExistInBinary holds manifests to
// the real flag set as well.
var contractFlags = map[string][]string{
	"agent": {"server-url", "node-name", "flush-interval", "attach-mode", "netfilter-priority", "cgroup-path",
		"max-flows", "flow-table-memory", "max-buffered-flows", "local-prefixes", "kubeconfig", "token-file", "listen-address",
		"log-level", "log-format"},
	"server": {"listen-address", "kubeconfig", "auth-mode", "token-file", "static-endpoints-file", "all-pairs",
		"max-pod-pairs", "series-idle-timeout", "released-ip-ttl", "released-ip-cache-size", "flow-log-classes",
		"log-level", "log-format", "remote-write-url", "remote-write-config", "push-interval", "external-label",
		"remote-write-retry-on-429", "remote-write-max-series-per-request", "remote-write-shards", "token-audience",
		"state-dir", "checkpoint-interval", "shutdown-grace-period"},
}

// envTwin is the environment variable of a flag.
func envTwin(flag string) string {
	return "KUBEZONNET_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// invocation is what one container of the manifests asks of the binary.
type invocation struct {
	where      string // kustomization, workload, container
	subcommand string
	flags      []string
	env        []string // KUBEZONNET_* variables
}

// manifestInvocations collects, from every rendered kustomization, the
// subcommand, flags and KUBEZONNET_* variables of each container.
func manifestInvocations(t *testing.T) []invocation {
	t.Helper()
	var out []invocation
	for _, dir := range Kustomizations {
		for name, tmpl := range podTemplates(objects(t, dir)) {
			for _, c := range tmpl.Spec.Containers {
				inv := invocation{where: fmt.Sprintf("%s: %s container %s", dir, name, c.Name)}
				if len(c.Command) != 0 {
					t.Errorf("%s: overrides the image's entrypoint with %v", inv.where, c.Command)
				}
				if len(c.Args) == 0 || strings.HasPrefix(c.Args[0], "-") {
					t.Errorf("%s: args %v do not start with a subcommand", inv.where, c.Args)
					continue
				}
				inv.subcommand = c.Args[0]
				for _, a := range c.Args[1:] {
					name, ok := strings.CutPrefix(a, "--")
					if !ok {
						t.Errorf("%s: argument %q is not a --flag", inv.where, a)
						continue
					}
					name, _, _ = strings.Cut(name, "=")
					inv.flags = append(inv.flags, name)
				}
				for _, e := range c.Env {
					if strings.HasPrefix(e.Name, "KUBEZONNET_") {
						inv.env = append(inv.env, e.Name)
					}
				}
				out = append(out, inv)
			}
		}
	}
	return out
}

// TestManifestFlagsInContract: every flag and KUBEZONNET_* variable in the
// manifests is one the contract defines for that subcommand. This runs
// before the subcommands exist, so a typo is caught today.
func TestManifestFlagsInContract(t *testing.T) {
	for _, inv := range manifestInvocations(t) {
		known, ok := contractFlags[inv.subcommand]
		if !ok {
			t.Errorf("%s: unknown subcommand %q", inv.where, inv.subcommand)
			continue
		}
		if inv.subcommand == "server" {
			known = slices.Concat(known, slices.Collect(maps.Keys(remoteWriteFlagNames())))
		}
		for _, f := range inv.flags {
			if !slices.Contains(known, f) {
				t.Errorf("%s: --%s is not a %s flag of the contract", inv.where, f, inv.subcommand)
			}
		}
		for _, e := range inv.env {
			if !slices.ContainsFunc(known, func(f string) bool { return envTwin(f) == e }) {
				t.Errorf("%s: %s is not the variable of a %s flag of the contract", inv.where, e, inv.subcommand)
			}
		}
	}
}

// TestManifestFlagsExistInBinary builds kubezonnet and checks every
// subcommand, flag and variable the manifests use against the binary's
// --help output.
func TestManifestFlagsExistInBinary(t *testing.T) {
	invs := manifestInvocations(t)
	bin := buildBinary(t)
	commands := subcommands(t, bin)
	bySub := map[string][]invocation{}
	for _, inv := range invs {
		bySub[inv.subcommand] = append(bySub[inv.subcommand], inv)
	}
	for _, sub := range slices.Sorted(maps.Keys(bySub)) {
		t.Run(sub, func(t *testing.T) {
			if !slices.Contains(commands, sub) {
				t.Fatalf("the binary has no %q subcommand (it has %v)", sub, commands)
			}
			help := runHelp(t, bin, sub)
			flags := map[string]bool{}
			// Flag definitions start a line of the OPTIONS section; a flag
			// merely mentioned in another's usage text does not count.
			for _, m := range regexp.MustCompile(`(?m)^\s+--([a-z0-9][a-z0-9-]*)`).FindAllStringSubmatch(help, -1) {
				flags[m[1]] = true
			}
			for _, inv := range bySub[sub] {
				for _, f := range inv.flags {
					if !flags[f] {
						t.Errorf("%s: `kubezonnet %s` has no flag --%s", inv.where, sub, f)
					}
				}
				for _, e := range inv.env {
					if !strings.Contains(help, "$"+e) {
						t.Errorf("%s: `kubezonnet %s` reads no variable %s", inv.where, sub, e)
					}
				}
			}
		})
	}
}

var (
	binOnce sync.Once
	binPath string
	binErr  error
	binDir  string
)

// TestMain removes the binary buildBinary made.
func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// buildBinary builds the kubezonnet command once per test run.
func buildBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "kubezonnet-bin-")
		if binErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "kubezonnet")
		cmd := exec.CommandContext(context.Background(), "go", "build", "-o", binPath, ".")
		cmd.Dir = ".."
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			binErr = fmt.Errorf("go build: %w\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// subcommands lists the commands of `kubezonnet --help`.
func subcommands(t *testing.T, bin string) []string {
	t.Helper()
	help := runHelp(t, bin)
	_, after, ok := strings.Cut(help, "COMMANDS:\n")
	if !ok {
		t.Fatalf("no COMMANDS section in kubezonnet --help:\n%s", help)
	}
	var cmds []string
	for line := range strings.Lines(after) {
		if strings.TrimSpace(line) == "" || !strings.HasPrefix(line, " ") {
			break
		}
		name, _, _ := strings.Cut(strings.TrimSpace(line), " ")
		cmds = append(cmds, strings.TrimSuffix(name, ","))
	}
	return cmds
}

func runHelp(t *testing.T, bin string, args ...string) string {
	t.Helper()
	out, err := exec.Command(bin, append(args, "--help")...).CombinedOutput()
	if err != nil {
		t.Fatalf("kubezonnet %s --help: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}
