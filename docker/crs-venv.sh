# /etc/profile.d/crs-venv.sh in the trainer image: login shells (`bash -lc`, which KubeRay
# 1.2-1.3 use to start Ray) source Debian's /etc/profile, which resets PATH and drops the
# Dockerfile's ENV PATH. Put the venv back in front; `ray` and `crs-rlhf` also have links in
# /usr/local/bin for shells that skip /etc/profile.d.
case ":${PATH}:" in
  *:/opt/venv/bin:*) ;;
  *) PATH="/opt/venv/bin:${PATH}" ;;
esac
export PATH
