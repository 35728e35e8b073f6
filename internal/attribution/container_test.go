package attribution

import "testing"

func TestParseCgroup(t *testing.T) {
	const id = "4b825dc642cb6eb9a060e54bf8d69288fbee4904a8f7b1d3e2c6f0a9b8c7d6e5"
	cases := []struct {
		name, cgroup string
		want         Container
	}{
		{"containerd, systemd driver", "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f2e3d4c_5b6a_7980_a1b2_c3d4e5f60718.slice/cri-containerd-" + id + ".scope",
			Container{Runtime: "containerd", ID: id, PodUID: "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718"}},
		{"containerd, cgroupfs driver", "0::/kubepods/besteffort/pod1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718/" + id,
			Container{Runtime: "containerd", ID: id, PodUID: "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718"}},
		{"CRI-O", "0::/kubepods.slice/kubepods-pod1f2e3d4c_5b6a_7980_a1b2_c3d4e5f60718.slice/crio-" + id + ".scope",
			Container{Runtime: "cri-o", ID: id, PodUID: "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718"}},
		{"ECS", "0::/ecs/8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d/" + id,
			Container{Runtime: "docker", ID: id, TaskID: "8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d"}},
		{"Docker, systemd driver", "0::/system.slice/docker-" + id + ".scope", Container{Runtime: "docker", ID: id}},
		{"Docker, cgroupfs driver", "0::/docker/" + id, Container{Runtime: "docker", ID: id}},
		{"cgroup v1 lines", "12:pids:/docker/" + id + "\n1:name=systemd:/docker/" + id, Container{Runtime: "docker", ID: id}},
		{"ECS, read from a cgroup namespace of the reader's own", "0::/../../ecs/8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d/" + id,
			Container{Runtime: "docker", ID: id, TaskID: "8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d"}},
		{"Docker, read from a cgroup namespace of the reader's own", "0::/../docker/" + id, Container{Runtime: "docker", ID: id}},
		{"containerd, read from a cgroup namespace of the reader's own", "0::/../../kubepods/besteffort/pod1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718/" + id,
			Container{Runtime: "containerd", ID: id, PodUID: "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718"}},
		{"a path that only ends in ecs", "0::/services/myecs/8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d/" + id, Container{ID: id}},
		{"a host process", "0::/system.slice/sshd.service", Container{}},
		{"a user's session", "0::/user.slice/user-0.slice/session-1.scope", Container{}},
		{"a short hex name", "0::/docker/4b825dc642cb", Container{}},
		{"empty", "", Container{}},
	}
	for _, c := range cases {
		if got := ParseCgroup(c.cgroup); got != c.want {
			t.Errorf("%s: %+v, want %+v", c.name, got, c.want)
		}
	}
}
