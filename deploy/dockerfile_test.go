package deploy

import (
	"bufio"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// dockerInstruction is one instruction of a Dockerfile, continuation
// lines joined.
type dockerInstruction struct {
	cmd  string // upper case: FROM, RUN, COPY, ...
	args string
}

// parseDockerfile reads the instructions of a Dockerfile: comments and
// blank lines dropped, backslash continuations joined. Docker engine does
// not run on the development machines, so the Dockerfile is checked
// statically here rather than with `docker build --check` (which also
// needs buildx, absent there).
func parseDockerfile(t *testing.T, path string) []dockerInstruction {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []dockerInstruction
	var cur strings.Builder
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "#") || (line == "" && cur.Len() == 0) {
			continue
		}
		if more, ok := strings.CutSuffix(line, "\\"); ok {
			cur.WriteString(more + " ")
			continue
		}
		cur.WriteString(line)
		cmd, args, _ := strings.Cut(cur.String(), " ")
		out = append(out, dockerInstruction{strings.ToUpper(cmd), strings.Join(strings.Fields(args), " ")})
		cur.Reset()
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if cur.Len() != 0 {
		t.Fatalf("%s ends in a continuation line", path)
	}
	return out
}

// TestDockerfile: a multi-stage build whose final stage holds only the
// static kubezonnet binary on a distroless base, running as non-root, built
// with the Go version go.mod asks for.
func TestDockerfile(t *testing.T) {
	ins := parseDockerfile(t, "../Dockerfile")
	known := map[string]bool{"FROM": true, "ARG": true, "WORKDIR": true, "COPY": true, "RUN": true, "USER": true, "ENTRYPOINT": true, "ENV": true, "LABEL": true}
	var stages []string // stage names, in order
	var finalBase, entrypoint, user, buildRun string
	var finalCopies []string
	for _, in := range ins {
		if !known[in.cmd] {
			t.Errorf("unknown or unexpected instruction %s %s", in.cmd, in.args)
		}
		switch in.cmd {
		case "FROM":
			f := strings.Fields(in.args)
			f = slices.DeleteFunc(f, func(s string) bool { return strings.HasPrefix(s, "--platform=") })
			finalBase = f[0]
			name := ""
			if len(f) == 3 && strings.EqualFold(f[1], "AS") {
				name = f[2]
			}
			stages = append(stages, name)
			finalCopies, user, entrypoint = nil, "", ""
		case "COPY":
			if from, ok := strings.CutPrefix(in.args, "--from="); ok {
				stage, _, _ := strings.Cut(from, " ")
				if !slices.Contains(stages[:len(stages)-1], stage) {
					t.Errorf("COPY --from=%s names no earlier stage (%v)", stage, stages)
				}
			}
			finalCopies = append(finalCopies, in.args)
		case "RUN":
			if strings.Contains(in.args, "go build") {
				buildRun = in.args
			}
		case "USER":
			user = in.args
		case "ENTRYPOINT":
			entrypoint = in.args
		}
	}
	if len(stages) < 2 {
		t.Fatalf("%d stages, want a build stage and a runtime stage", len(stages))
	}
	if !strings.HasPrefix(finalBase, "gcr.io/distroless/static") && finalBase != "scratch" {
		t.Errorf("final stage is based on %s, want a static distroless image or scratch", finalBase)
	}
	if len(finalCopies) != 1 || !strings.HasSuffix(finalCopies[0], " /kubezonnet") {
		t.Errorf("final stage copies %v, want only the binary to /kubezonnet", finalCopies)
	}
	if entrypoint != `["/kubezonnet"]` {
		t.Errorf("ENTRYPOINT %s, want [\"/kubezonnet\"] (manifests pass the subcommand as args)", entrypoint)
	}
	if uid, _, _ := strings.Cut(user, ":"); uid == "" || uid == "0" || uid == "root" {
		t.Errorf("final stage runs as %q, want a non-root user", user)
	}
	for _, want := range []string{"CGO_ENABLED=0", "-o /out/kubezonnet .", "internal/version.Version="} {
		if !strings.Contains(buildRun, want) {
			t.Errorf("go build step %q lacks %q", buildRun, want)
		}
	}
	// The builder's Go version is the one go.mod declares.
	gomod, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	goVersion := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(gomod)
	if goVersion == nil {
		t.Fatal("go.mod has no go directive")
	}
	builder := ""
	for _, in := range ins {
		if in.cmd == "FROM" && strings.Contains(in.args, "golang:") {
			builder = in.args
		}
	}
	if !strings.Contains(builder, "golang:"+string(goVersion[1])+"-") && !strings.HasSuffix(builder, "golang:"+string(goVersion[1])) {
		t.Errorf("builder %q does not use Go %s of go.mod", builder, goVersion[1])
	}
}

// releaseVersion is the content of the file VERSION, checked to be a
// semantic version tag.
func releaseVersion(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../VERSION")
	if err != nil {
		t.Fatal(err)
	}
	v := strings.TrimSpace(string(b))
	if !regexp.MustCompile(`^v[0-9]+\.[0-9]+\.[0-9]+$`).MatchString(v) {
		t.Fatalf("VERSION holds %q, want vMAJOR.MINOR.PATCH", v)
	}
	return v
}

// TestMakeImage checks that `make image` builds this Dockerfile with the
// repository and tag the manifests use (the file VERSION), and that a
// VERSION given to make wins (make -n only prints the commands: no Docker
// engine runs here).
func TestMakeImage(t *testing.T) {
	mk, err := exec.LookPath("make")
	if err != nil {
		t.Skipf("make not installed: %v", err)
	}
	version := releaseVersion(t)
	for _, tc := range []struct {
		args []string
		tag  string
	}{
		{nil, version},
		{[]string{"VERSION=v9.9.9"}, "v9.9.9"},
	} {
		out, err := exec.Command(mk, append([]string{"-n", "-C", "..", "image"}, tc.args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("make -n image %v: %v\n%s", tc.args, err, out)
		}
		cmd := string(out)
		for _, want := range []string{" build ", "-f Dockerfile", "-t ghcr.io/kubezonnet/kubezonnet:" + tc.tag, "VERSION=" + tc.tag} {
			if !strings.Contains(cmd, want) {
				t.Errorf("make image %v runs %q, lacking %q", tc.args, strings.TrimSpace(cmd), want)
			}
		}
	}
}
